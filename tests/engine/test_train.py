"""The training engine end to end on scikit-learn's digits with a tiny ViT (CPU, a few seconds per run)."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vpeft
from vpeft.backbones.checkpoint import load_pretrained, read_state_dict
from vpeft.engine import train as engine
from vpeft.engine.checkpoint import CHECKPOINT
from vpeft.engine.config import config_diff, load_config
from vpeft.engine.optim import cosine_with_warmup, param_groups
from vpeft.errors import ConfigError
from vpeft.tasks.classification import build_model

from ..conftest import Interrupt, killed_at_epoch

ROOT = Path(__file__).resolve().parents[2]

TINY = """
model:
  name: vit_tiny_patch16_224
  img_size: 32
  kwargs: {patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}
method:
  name: lora
data:
  name: digits
  batch_size: 128
  num_workers: 0
optim:
  lr: 3.0e-3
  warmup_epochs: 0.5
train:
  epochs: 2
  log_every: 2
  tensorboard: false
"""


def config(tmp_path: Path, *overrides: str):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return load_config(path, list(overrides))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_summary_and_test_tool(tmp_path):
    summary = engine.train(config(tmp_path), tmp_path / "run")
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "checkpoint.pt", "adapter", "summary.json"} <= {
        p.name for p in run.iterdir()
    }
    assert summary["trainable_params"] == 2 * 2 * 8 * (32 + 32) and summary["trainable_params_with_head"] == 2048 + 330
    assert summary["test"] == json.loads((run / "summary.json").read_text())["test"]
    assert summary["best_val"]["epoch"] in (1, 2) and torch.__version__.startswith(summary["versions"]["torch"])
    train_losses = [r["loss"] for r in records(run) if "split" not in r]
    assert len(train_losses) == 2 * math.ceil(1079 / 128) // 2 and all(math.isfinite(x) for x in train_losses)

    import tools.test as test_tool  # the saved adapter reproduces the run's test metrics

    test_tool.main([str(run)])
    again = json.loads((run / "test_metrics.json").read_text())
    assert again["top1"] == pytest.approx(summary["test"]["top1"]) and again["loss"] == pytest.approx(
        summary["test"]["loss"], rel=1e-5
    )


def test_resume_after_a_kill_mid_epoch_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    engine.train(config(tmp_path, "train.epochs=3"), tmp_path / "whole")

    real_loader = engine._loader

    def dying_loader(cfg, task, dataset, train, dist=None, epoch=0):
        loader = real_loader(cfg, task, dataset, train, dist, epoch)
        if not (train and epoch == 1):
            return loader

        class Dies:  # the second epoch is killed after three batches
            def __len__(self):
                return len(loader)

            def __iter__(self):
                for i, batch in enumerate(loader):
                    if i == 3:
                        raise Interrupt
                    yield batch

        return Dies()

    monkeypatch.setattr(engine, "_loader", dying_loader)
    with pytest.raises(Interrupt):
        engine.train(config(tmp_path, "train.epochs=3"), tmp_path / "split")
    shutil.copytree(tmp_path / "split", tmp_path / "older")
    monkeypatch.setattr(engine, "_loader", real_loader)
    resumed = engine.train(config(tmp_path, "train.epochs=3"), tmp_path / "split", resume=True)
    assert records(tmp_path / "split") == records(tmp_path / "whole")
    assert resumed["test"] == json.loads((tmp_path / "whole" / "summary.json").read_text())["test"]

    # a checkpoint of an earlier vpeft keyed the optimizer state by position (optimizer.state_dict()): it resumes too
    path = tmp_path / "older" / CHECKPOINT
    state = torch.load(path, weights_only=True)
    names = [n for group in state["optimizer"]["param_groups"] for n in group["params"]]
    position = {n: i for i, n in enumerate(names)}
    groups = state["optimizer"]["param_groups"]
    state["optimizer"] = {
        "state": {position[n]: v for n, v in state["optimizer"]["state"].items()},
        "param_groups": [dict(g, params=[position[n] for n in g["params"]]) for g in groups],
    }
    torch.save(state, path)
    engine.train(config(tmp_path, "train.epochs=3"), tmp_path / "older", resume=True)
    assert records(tmp_path / "older") == records(tmp_path / "whole")


def test_run_directory_guards(tmp_path):
    engine.train(config(tmp_path, "train.epochs=1"), tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        engine.train(config(tmp_path, "train.epochs=1"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"config differs from the run's in \['optim.lr'\].*--force"):
        engine.train(config(tmp_path, "train.epochs=1", "optim.lr=0.1"), tmp_path / "run", resume=True)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        engine.train(config(tmp_path), tmp_path / "nowhere", resume=True)


def test_missing_dataset_path_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        engine.train(config(tmp_path, "data.name=folder", f"data.root={tmp_path / 'absent'}"), tmp_path / "run")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = vpeft.method_loss

    def poisoned(model, context=None):
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] > 10 else real(model, context)

    monkeypatch.setattr(vpeft, "method_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 10 \(epoch 2\).*checkpoint.pt"):
        engine.train(config(tmp_path), tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["counters"]["epoch"] == 1 and saved["counters"]["step"] == 9


def test_first_step_names_tensors_without_gradient(tmp_path, monkeypatch):
    real_apply = vpeft.apply_method

    def apply_and_add_unused(model, name, **kwargs):
        report = real_apply(model, name, **kwargs)
        layer = vpeft.core.layers_of(model, "default")[0]
        layer.unused = torch.nn.Parameter(torch.zeros(3))  # trainable, never in the forward pass
        return report

    monkeypatch.setattr(vpeft, "apply_method", apply_and_add_unused)
    with pytest.raises(RuntimeError, match=r"got no gradient in the first step, e.g. \['blocks.0.attn.qkv.*unused'\]"):
        engine.train(config(tmp_path), tmp_path / "run")


def test_no_weight_decay_for_biases_norms_tokens_and_prompts():
    model = build_model(
        "vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    vpeft.apply_method(model, "full")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"cls_token", "pos_embed", "norm.weight", "head.bias"}
    assert all(p.ndim > 1 for p in decay["params"]) and "head.weight" in {names[id(p)] for p in decay["params"]}
    prompted = build_model(
        "vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    vpeft.apply_method(prompted, "vpt_deep")
    groups = param_groups(prompted, 0.1)
    prompts = [p for n, p in prompted.named_parameters() if n.endswith("prompts")]
    assert prompts and all(any(p is q for q in groups[-1]["params"]) for p in prompts)
    assert groups[-1]["weight_decay"] == 0.0


def test_schedule_is_linear_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = cosine_with_warmup(opt, total_steps=12, warmup_steps=4, min_lr=0.0)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(8)])


def test_checkpoint_loading_strips_wrappers_and_replaces_the_head(tmp_path):
    source = build_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ddp.pth")
    target = build_model(
        "vit_tiny_patch16_224",
        num_classes=4,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        pretrained=str(tmp_path / "ddp.pth"),
    )
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert target.head.weight.shape == (4, 32)
    wrong = build_model(
        "vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    )
    with pytest.raises(ValueError, match=r"1 missing|missing \(e.g. \['blocks.1"):
        load_pretrained(wrong, tmp_path / "ddp.pth")


class Exploit:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_pickled_code_is_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Exploit()}, f)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        read_state_dict(tmp_path / "evil.pth")
    assert "this pickle ran code" not in capsys.readouterr().out


def test_gradient_checkpointing_and_bf16_autocast_keep_adapters_training_in_fp32(tmp_path, monkeypatch):
    seen = {}
    real_check = engine.check_gradients

    def spy(model):
        real_check(model)  # raises if checkpointing cut the graph to an adapter
        seen["dtypes"] = {p.dtype for p in model.parameters() if p.requires_grad}
        seen["grads"] = sum(int(p.grad is not None) for p in model.parameters() if p.requires_grad)

    monkeypatch.setattr(engine, "check_gradients", spy)
    cfg = config(tmp_path, "train.epochs=1", "model.grad_checkpointing=true", "train.amp=bf16", "method.name=bitfit")
    summary = engine.train(cfg, tmp_path / "run")
    assert seen["dtypes"] == {torch.float32} and seen["grads"] > 0
    assert math.isfinite(summary["test"]["loss"])


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    # BitFit has no dropout and drop_path is 0, so two half batches give the gradient of the whole batch
    whole = config(tmp_path, "train.epochs=1", "method.name=bitfit", "data.val_split=null")
    halves = config(tmp_path, "train.epochs=1", "method.name=bitfit", "data.val_split=null", "data.batch_size=64",
                    "optim.accumulate=2")  # fmt: skip
    engine.train(whole, tmp_path / "whole")
    engine.train(halves, tmp_path / "halves")
    a, b = records(tmp_path / "whole"), records(tmp_path / "halves")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.get("loss") == pytest.approx(y.get("loss"), rel=1e-4, abs=1e-6)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_uses_the_run_config_and_a_finished_run_is_left_as_it_is(tmp_path, caplog):
    import tools.train as train_tool

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    sets = ["--set", "optim.lr=5e-3", "method.r=4"]
    train_tool.main([str(path), *sets, "--work-dir", str(tmp_path / "whole")])

    with killed_at_epoch(1):  # after the first epoch's checkpoint
        train_tool.main([str(path), *sets, "--work-dir", str(tmp_path / "split")])
    split = tmp_path / "split"
    # the file alone gives the run's config back: the first call's overrides come from origin.json
    assert config_diff(engine.resume_config(split, path)[0], load_config(split / "config.yaml")) == []
    train_tool.main(["--resume", str(split)])  # no CONFIG, no --set repeated
    assert records(split) == records(tmp_path / "whole")
    assert load_config(split / "config.yaml").optim.lr == 5e-3
    assert json.loads((split / "classes.json").read_text()) == [str(i) for i in range(10)]

    before = snapshot(split)
    caplog.clear()
    with caplog.at_level("INFO", logger="vpeft"):
        train_tool.main(["--resume", str(split)])
        train_tool.main([str(path), "--resume", str(split)])
    said = f"vpeft: {split} already finished (2 epochs); nothing to do."
    assert [r.getMessage() for r in caplog.records] == [said, said]
    assert snapshot(split) == before  # no re-evaluation, no new test line, summary.json untouched

    path.write_text(TINY.replace("epochs: 2", "epochs: 3"))  # an edited config is a change: refused...
    with pytest.raises(ValueError, match=r"differs from the run's in \['train.epochs'\].*--force"):
        train_tool.main([str(path), "--resume", str(split)])
    assert snapshot(split) == before
    train_tool.main([str(path), "--resume", str(split), "--force"])  # ...and with --force written and trained on
    saved = load_config(split / "config.yaml")
    assert saved.train.epochs == 3 and saved.optim.lr == 5e-3 and saved.method.options == {"r": 4}
    lines = records(split)
    assert [r["split"] for r in lines if "split" in r] == ["val", "val", "val", "test"]
    assert lines[: len(records(tmp_path / "whole")) - 1] == records(tmp_path / "whole")[:-1]


def test_resume_refuses_what_is_not_a_run(tmp_path):
    import tools.train as train_tool

    with pytest.raises(FileNotFoundError, match="not a run directory"):
        train_tool.main(["--resume", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        train_tool.main([])  # neither CONFIG nor --resume


EPOCH_LINE = (
    r"epoch (?P<epoch>\d+)/2  train loss (?P<loss>\d+\.\d{4})  val top1 (?P<top1>\d+\.\d\d)  "
    r"lr (?P<lr>\d\.\d\de[-+]\d\d)  (?P<seconds>\d+\.\d) s"
)


def test_one_log_line_per_epoch_and_no_progress_bar_without_a_terminal(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("log_every: 2", "log_every: 1"))
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), str(path), "--work-dir", str(run)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr and "\x1b[" not in done.stderr  # stderr is a pipe: no tqdm bar
    lines = [m for line in done.stderr.splitlines() if (m := re.fullmatch(EPOCH_LINE, line))]
    assert [int(m["epoch"]) for m in lines] == [1, 2]
    logged = records(run)
    for m in lines:  # each field against metrics.jsonl, where every step was logged
        epoch = int(m["epoch"])
        steps = [r for r in logged if r["epoch"] == epoch and "split" not in r]
        assert float(m["loss"]) == pytest.approx(sum(r["loss"] for r in steps) / len(steps), abs=5e-5)
        val = next(r for r in logged if r["epoch"] == epoch and r.get("split") == "val")
        assert float(m["top1"]) == pytest.approx(val["top1"], abs=5e-3)
        assert float(m["lr"]) == pytest.approx(steps[-1]["lr"], rel=5e-3)


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    engine.train(config(tmp_path, "train.epochs=1", "data.val_split=null"), tmp_path / "run")
    assert "\r" in screen.getvalue() and "epoch 1/1" in screen.getvalue() and "loss=" in screen.getvalue()


def test_a_run_that_fails_to_build_leaves_its_directory_empty(tmp_path):
    bad = config(tmp_path, "data.name=folder", f"data.root={tmp_path / 'absent'}")
    with pytest.raises(FileNotFoundError):
        engine.train(bad, tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []  # so the corrected command runs in it without --resume


def test_group_by_length_needs_data_that_knows_its_lengths(tmp_path):
    with pytest.raises(ConfigError, match="data.group_by_length is true.*does not know its items' lengths"):
        engine.train(config(tmp_path, "data.group_by_length=true"), tmp_path / "run")
