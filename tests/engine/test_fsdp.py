"""FSDP (``train.parallel: fsdp``): two torchrun processes (gloo, CPU) with sharded tensors learn what one process
learns from the same batches, write the same files, resume exactly, and refuse what they cannot shard."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vpeft.engine import train as engine
from vpeft.engine.config import load_config

from .test_train import TINY, records

ROOT = Path(__file__).resolve().parents[2]
# no dropout: nothing random inside a step, so one process and two differ only in the order of sums; clipping on
# (0.05 clips every step here), on the CPU also where there is a GPU
LORA = ["method.dropout=0.0", "train.log_every=1", "train.max_steps=8", "optim.grad_clip=0.05", "train.device=cpu"]


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # this tree's vpeft, not an installed one
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def steps(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "split" not in r]


def test_fsdp_through_train_py_matches_one_process_and_its_adapter_loads_in_one(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    one = engine.train(load_config(path, LORA), tmp_path / "one")
    torchrun(str(ROOT / "tools" / "train.py"), str(path), "--work-dir", str(tmp_path / "two"),
             "--set", *LORA, "data.batch_size=32", "optim.accumulate=2", "train.parallel=fsdp")  # fmt: skip
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1 and two["steps"] == one["steps"] == 8

    # 8 full steps; each global batch is the same 128 images (strided shards of one permutation), here 2 micro-batches
    # of 32 in each of 2 processes
    a, b = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)

    # the adapter files have a one-process run's layout (whole tensors, same keys and config) and values
    files = lambda run: load_file(str(run / "adapter" / "adapter_model.safetensors"))  # noqa: E731
    solo, sharded = files(tmp_path / "one"), files(tmp_path / "two")
    assert sorted(solo) == sorted(sharded) and len(solo) == 10
    for key, value in solo.items():
        assert sharded[key].shape == value.shape, key
        torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-6, msg=key)
    config = lambda run: json.loads((run / "adapter" / "adapter_config.json").read_text())  # noqa: E731
    assert config(tmp_path / "one") == config(tmp_path / "two")
    # the training checkpoint holds whole tensors too: the same ones as the adapter file
    state = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(state["trainable"][k], v) for k, v in sharded.items())

    import tools.test as test_tool  # one process evaluates the FSDP run's adapter: the run's own test numbers

    test_tool.main([str(tmp_path / "two")])
    again = json.loads((tmp_path / "two" / "test_metrics.json").read_text())
    assert again["top1"] == pytest.approx(two["test"]["top1"]) and again["loss"] == pytest.approx(
        two["test"]["loss"], rel=1e-5
    )


def test_a_resumed_fsdp_run_continues_exactly(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    whole, split = tmp_path / "whole", tmp_path / "split"
    sets = ["method.dropout=0.0", "train.log_every=1", "data.batch_size=64", "train.parallel=fsdp", "train.device=cpu"]
    torchrun(str(ROOT / "tools" / "train.py"), str(path), "--work-dir", str(whole), "--set", *sets)
    torchrun(str(Path(__file__).with_name("fsdp_resume.py")), str(path), str(split), *sets)
    # the sharded optimizer state went through the checkpoint whole and was sliced again: the same steps follow
    assert len(steps(whole)) == 18 and records(split) == records(whole)
    files = lambda run: load_file(str(run / "adapter" / "adapter_model.safetensors"))  # noqa: E731
    a, b = files(whole), files(split)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_on_a_tiny_llama_sharded_over_two_processes_matches_one(tmp_path):
    pytest.importorskip("transformers")
    from vpeft.engine.distributed import Dist

    from .fsdp_llama import STEPS, train

    torchrun(str(Path(__file__).with_name("fsdp_llama.py")), str(tmp_path))
    two = json.loads((tmp_path / "losses.json").read_text())
    sharded = load_file(str(tmp_path / "adapter.safetensors"))
    losses, solo, _ = train(Dist())  # one process, the same global batches
    # 2 decoder layers, 4 LoRA modules (q and v of each), the root
    assert two["units"] == 7 and len(two["losses"]) == STEPS
    assert two["losses"] == pytest.approx(losses, rel=1e-5) and losses[-1] < losses[0]
    assert sorted(sharded) == sorted(solo) and len(solo) == 8
    for key, value in solo.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_fsdp_without_torchrun_says_what_to_run(tmp_path, monkeypatch, capsys):
    import tools.train as train_tool
    from vpeft.engine import cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    argv = [str(path), "--set", "train.parallel=fsdp", "--work-dir", str(tmp_path / "run")]
    assert cli.run(train_tool.main, argv) == cli.USER_ERROR
    said = capsys.readouterr().err
    assert "train.parallel is 'fsdp' but this is a single process" in said and "torchrun --nproc_per_node=N" in said
    assert "Traceback" not in said and not (tmp_path / "run").exists()


@pytest.fixture
def one_process_group():
    """A one-process gloo group, so that torch's own ``fully_shard`` can be asked what it refuses."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("method", "unfreeze", "said", "torch_says"),
    [
        ("earth_adapter", None, "fully_shard refuses scalar tensors", "doesn't support scalar parameters"),
        ("soma", None, "fully_shard refuses non-contiguous tensors", "does not support non-contiguous parameters"),
        ("lora", "blocks.0.norm1.weight", "would hold trainable ['blocks.0.norm1.weight']", None),
    ],
)
def test_what_fsdp_cannot_shard_is_named_and_nothing_is_sharded(one_process_group, method, unfreeze, said, torch_says):
    from torch.distributed.fsdp import FSDPModule, fully_shard

    import vpeft
    from vpeft.engine.distributed import shard
    from vpeft.errors import ConfigError

    from ..conftest import tiny_vit

    model = tiny_vit()
    vpeft.apply_method(model, method)
    if unfreeze:  # a base tensor trained beside the adapter inside a transformer block
        model.get_parameter(unfreeze).requires_grad_(True)
    with pytest.raises(ConfigError, match=rf"method '{method}'.*train.parallel: ddp") as err:
        shard(model)
    assert said in str(err.value)
    assert not any(isinstance(m, FSDPModule) for m in model.modules())  # checked before anything was sharded
    if torch_says:  # torch refuses the tensor the message names
        name = re.search(r"e\.g\. \['([^']+)'", str(err.value)).group(1)
        with pytest.raises((ValueError, NotImplementedError), match=torch_says):
            fully_shard(model.get_submodule(name.rsplit(".", 1)[0]))
