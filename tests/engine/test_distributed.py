"""Data-parallel training: two torchrun processes (gloo, CPU) learn what one process learns from the same batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from vpeft.engine import train as engine
from vpeft.engine.config import load_config

from .test_train import TINY, records

ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_match_one(tmp_path):
    path = tmp_path / "tiny.yaml"
    # BitFit and no drop path: no randomness inside the step, so the comparison is exact up to summation order
    path.write_text(TINY.replace("name: lora", "name: bitfit"))
    one = engine.train(load_config(path, ["train.epochs=1"]), tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # this tree's vpeft, not an installed one
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tools" / "train.py"), str(path), "--work-dir", str(tmp_path / "two"),
           "--set", "train.epochs=1", "data.batch_size=64"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    # every global batch is the same 128 images (strided shards of one permutation); only the last batch differs, by
    # the one sample the sampler repeats to split 1,079 images evenly
    a = [r for r in records(tmp_path / "one") if "split" not in r]
    b = [r for r in records(tmp_path / "two") if "split" not in r]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a[:-1], b[:-1], strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
    assert two["test"]["top1"] == pytest.approx(one["test"]["top1"], abs=1.0)
    assert two["test"]["loss"] == pytest.approx(one["test"]["loss"], rel=1e-2)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.parametrize("method", ["lora", "fact_tt", "vpt_deep", "linear"])
def test_fsdp_units_never_mix_frozen_and_trainable_tensors(method):
    import vpeft
    from vpeft.core import fsdp_units

    from ..conftest import tiny_vit

    model = tiny_vit()
    vpeft.apply_method(model, method)
    units = fsdp_units(model)

    def owner(path: list[nn.Module]) -> nn.Module:  # FSDP flattens a tensor into its innermost enclosing unit
        return next((m for m in reversed(path) if m in units), model)

    flags: dict[int, set[bool]] = {}

    def visit(module: nn.Module, path: list[nn.Module]) -> None:
        for p in module.parameters(recurse=False):
            flags.setdefault(id(owner(path)), set()).add(p.requires_grad)
        for child in module.children():
            visit(child, [*path, child])

    visit(model, [model])
    assert len(flags) > 2 and all(len(f) == 1 for f in flags.values()), flags
