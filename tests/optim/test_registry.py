"""The optimiser registry as users meet it: ``optim.name`` and its options in run configs (every mistake one clear
error naming the key), the same from Python, a method's learning-rate multipliers, ``full`` limited to chosen
modules, and a killed run resumed with its optimiser state restored exactly."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import vpeft
from tools import train as train_tool
from vpeft.core import add_adapter
from vpeft.engine import cli
from vpeft.engine import train as engine
from vpeft.engine.config import load_config
from vpeft.errors import ConfigError, OptionError, OptionTypeError, UnknownNameError
from vpeft.methods.lora import LoRA, LoRAConfig

from ..conftest import killed_at_epoch, tiny_vit
from ..engine.test_train import TINY

MINIMAL = "model: {name: vit_tiny_patch16_224}\ndata: {name: digits}\n"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_optim_name_and_options_from_a_file_and_from_set(tmp_path):
    path = write(tmp_path, MINIMAL + "optim: {name: galore, rank: 64, lr: 0.01}\n")
    cfg = load_config(path)
    assert cfg.optim.name == "galore" and cfg.optim.options == {"rank": 64} and cfg.optim.lr == 0.01
    cfg = load_config(path, ["optim.update_proj_gap=50", "optim.rank=16"])
    assert cfg.optim.options == {"rank": 16, "update_proj_gap": 50}
    # another optimiser drops the earlier one's options and keeps the schedule's keys
    cfg = load_config(path, ["optim.name=adamw"])
    assert cfg.optim.name == "adamw" and cfg.optim.options == {} and cfg.optim.lr == 0.01
    child = write(tmp_path, "_base_: run.yaml\noptim: {name: natural_galore, damping: 0.01}\n", "child.yaml")
    assert load_config(child).optim.options == {"damping": 0.01}
    assert load_config(write(tmp_path, MINIMAL, "plain.yaml")).optim.name == "adamw"  # the default


@pytest.mark.parametrize(
    ("optim", "named"),
    [
        ("{name: galor}", ["optim.name", "unknown optimizer 'galor'", "Did you mean 'galore'", "adamw"]),
        ("{name: galore, rank: 0}", ["optim.rank", "must be >= 1, got 0"]),
        ("{name: galore, rank: '8'}", ["optim.rank", "must be int"]),
        ("{name: galore, proj_type: middle}", ["optim.proj_type", "'std'", "'full'"]),
        ("{name: galore, rnak: 8}", ["optim.rnak", "Did you mean 'optim.rank'", "galore's own options: targets"]),
        ("{rank: 8}", ["optim.rank", "unknown key", "adamw has no options"]),
        ("{name: galore, targets: []}", ["optim.targets", "at least one module pattern"]),
    ],
)
def test_bad_names_and_options_are_one_clear_error_naming_the_key_and_file(tmp_path, optim, named):
    path = write(tmp_path, MINIMAL + f"optim: {optim}\n", "myrun.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "myrun.yaml" in message
    for text in named:
        assert text in message, message


def test_a_bad_option_on_the_command_line_is_exit_status_two(tmp_path, capsys):
    path = write(tmp_path, MINIMAL)
    code = cli.run(train_tool.main, [str(path), "--set", "optim.name=galore", "optim.rank=-1", "--work-dir",
                                     str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == cli.USER_ERROR and "Traceback" not in err and "optim.rank" in err and "--set" in err
    assert not (tmp_path / "run").exists()


def test_the_same_from_python():
    model = tiny_vit()
    vpeft.apply_method(model, "full", modules=("block",))
    with pytest.raises(UnknownNameError, match="Did you mean 'galore'"):
        vpeft.build_optimizer(model, "galor")
    with pytest.raises(OptionTypeError, match=r"optimizer 'galore' has no option 'rnk'.*Did you mean 'rank'"):
        vpeft.build_optimizer(model, "galore", rnk=4)
    with pytest.raises(OptionError, match="rank must be >= 1") as info:
        vpeft.build_optimizer(model, "galore", rank=0)
    assert info.value.option == "rank"
    opt = vpeft.build_optimizer(model, "natural_galore", lr=0.01, rank=8, natural_history=4)
    projected = [g for g in opt.param_groups if "rank" in g]
    assert {g["natural_history"] for g in projected} == {4} and {g["proj_type"] for g in projected} == {"full"}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for g in projected for p in g["params"]) == sorted(
        n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2
    )
    assert isinstance(vpeft.build_optimizer(model), torch.optim.AdamW)  # adamw, the default
    assert set(vpeft.OPTIMIZERS) >= {"adamw", "galore", "natural_galore", "gradnorm_lorp"}


def test_a_projecting_optimiser_with_nothing_to_project_says_why():
    model = tiny_vit()
    vpeft.apply_method(model, "lora")  # the blocks' weights are frozen: only LoRA's r x d factors train
    with pytest.raises(ConfigError, match="a side of at most optim.rank = 128.*lower optim.rank"):
        vpeft.build_optimizer(model, "galore")
    frozen = tiny_vit()
    vpeft.apply_method(frozen, "full", modules=("head",))
    with pytest.raises(ConfigError, match="none of their weight matrices trains.*method full"):
        vpeft.build_optimizer(frozen, "galore", rank=4)
    with pytest.raises(ConfigError, match=r"optim.targets: target 'nothing\.here' matches no module"):
        vpeft.build_optimizer(frozen, "galore", targets=("nothing.here",))


def test_full_limited_to_modules_trains_exactly_their_tensors():
    model = tiny_vit()
    report = vpeft.apply_method(model, "full", modules=("attn",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in tiny_vit().named_parameters() if ".attn." in n}
    assert trainable == expected and len(expected) == 2 * 4  # qkv and proj, weight and bias, two blocks
    assert report.trainable == sum(p.numel() for n, p in tiny_vit().named_parameters() if n in expected)
    everything = tiny_vit()
    vpeft.apply_method(everything, "full")
    assert all(p.requires_grad for p in everything.parameters())


@dataclass
class FastBConfig(LoRAConfig):
    ratio: float = 4.0


class FastB(LoRA):
    """LoRA whose B trains ``ratio`` times faster (LoRA+'s rule), declared through ``lr_multipliers``."""

    Config = FastBConfig

    @classmethod
    def lr_multipliers(cls, config: FastBConfig) -> dict[str, float]:
        return {"lora_B": config.ratio}


def test_a_methods_learning_rate_multipliers_get_their_own_groups_and_keep_them_through_the_schedule():
    model = tiny_vit()
    add_adapter(model, FastB, "fast_b", FastBConfig(targets=("q", "v"), ratio=4.0))
    opt = vpeft.build_optimizer(model, lr=0.01)
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert by_param[id(p)] == pytest.approx(0.04 if name.endswith("lora_B") else 0.01), name
    schedule = engine.cosine_with_warmup(opt, total_steps=10, warmup_steps=2, min_lr=1e-8)
    for _ in range(5):
        opt.step()
        schedule.step()
    b = model.blocks[0].attn.qkv.adapters["default"]["q"].lora_B
    fast = next(g["lr"] for g in opt.param_groups if any(p is b for p in g["params"]))
    assert fast == pytest.approx(4 * opt.param_groups[0]["lr"]) and fast < 0.04  # the schedule moved both alike


def test_the_task_head_trains_at_head_lr_and_the_adapter_at_lr(tmp_path, caplog):
    """Adam's first step moves each element by its lr (|g| >> eps): the head copy by head_lr, LoRA's B by lr."""
    model = tiny_vit()
    vpeft.apply_method(model, "lora", targets=("q", "v"), head=("head",))
    opt = vpeft.build_optimizer(model, lr=1e-3, weight_decay=0.0, head_lr=1e-2)
    head = next(p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight") and "head" in n)
    b = model.blocks[0].attn.qkv.adapters["default"]["q"].lora_B
    before = head.detach().clone(), b.detach().clone()
    torch.manual_seed(1)
    model(torch.randn(4, 3, 32, 32)).logsumexp(-1).sum().backward()
    opt.step()
    moved_head, moved_b = (head - before[0]).abs(), (b - before[1]).abs()
    assert moved_head.max().item() == pytest.approx(1e-2, rel=1e-3)
    assert moved_b.max().item() == pytest.approx(1e-3, rel=1e-3)
    assert load_config(write(tmp_path, MINIMAL + "optim: {lr: 0.001, head_lr: 0.01}\n")).optim.head_lr == 0.01
    headless = tiny_vit()
    vpeft.apply_method(headless, "lora", targets=("q", "v"), head=())
    with caplog.at_level("WARNING", logger="vpeft"):
        vpeft.build_optimizer(headless, lr=1e-3, head_lr=1e-2)
    assert "optim.head_lr=0.01 is not used" in caplog.text  # said, not silently ignored
    with pytest.raises(ConfigError, match="optim.head_lr"):
        load_config(write(tmp_path, MINIMAL + "optim: {head_lr: 0}\n"))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["galore", "natural_galore", "gradnorm_lorp"])
def test_a_killed_run_resumed_equals_the_whole_run(tmp_path, name, one_thread):
    """``full`` on the blocks with a projecting optimiser (rank 4, a new subspace every 4 steps, 9 steps an epoch):
    the resumed run's losses equal the uninterrupted run's, so the projection basis, the moments (and Natural
    GaLore's history, GradNormLoRP's magnitudes) came back from the checkpoint exactly."""
    path = write(tmp_path, TINY)
    sets = ["method.name=full", "method.modules=[block]", f"optim.name={name}", "optim.rank=4",
            "optim.update_proj_gap=4", "train.log_every=1", "data.val_split=null"]  # fmt: skip
    whole = engine.train(load_config(path, sets), tmp_path / "whole")
    with killed_at_epoch(1):
        engine.train(load_config(path, sets), tmp_path / "split")
    resumed = engine.train(load_config(path, sets), tmp_path / "split", resume=True)
    assert records(tmp_path / "split") == records(tmp_path / "whole")
    assert resumed["test"] == whole["test"]
    assert whole["steps"] == 18
