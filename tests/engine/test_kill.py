"""Real kills (SIGKILL, no clean-up code runs): a training run killed mid-epoch resumes to the uninterrupted run's
metrics, and an adapter killed while being written is still the previous complete adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vpeft

from ..conftest import tiny_vit
from .test_train import TINY, records

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
# one thread in every child: the same float summation order in the killed, resumed and uninterrupted runs
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def train_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "train.py"), str(config), *args]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the child ended (rc {proc.returncode}) before the moment to kill it")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("the child did not reach the moment to kill it in time")
        time.sleep(0.005)


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path):
    config = tmp_path / "tiny.yaml"
    # 68 steps an epoch, every one logged: the kill lands well inside the second epoch
    config.write_text(TINY.replace("batch_size: 128", "batch_size: 16").replace("log_every: 2", "log_every: 1"))
    whole, split = tmp_path / "whole", tmp_path / "split"
    done = subprocess.run(train_cmd(config, "--work-dir", str(whole)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(train_cmd(config, "--work-dir", str(split)), env=ENV, stderr=subprocess.DEVNULL)
    metrics = split / "metrics.jsonl"

    def in_second_epoch() -> bool:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        train_steps = [json.loads(x) for x in lines if '"split"' not in x]
        return sum(r["epoch"] == 2 for r in train_steps) >= 20

    wait_for(in_second_epoch, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (split / "summary.json").exists()
    killed_at = len(records(split))

    done = subprocess.run(train_cmd(config, "--resume", str(split)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert killed_at < len(records(whole))
    assert records(split) == records(whole)  # losses, learning rates, validation and test metrics, bit for bit
    summary = json.loads((split / "summary.json").read_text())
    assert summary["test"] == json.loads((whole / "summary.json").read_text())["test"]


WRITER = """
import sys, torch, vpeft
from tests.conftest import tiny_vit
model = tiny_vit()
vpeft.apply_method(model, "lora")
b = model.blocks[0].attn.qkv.adapters["default"]["q"].lora_B
i = 0
while True:
    i += 1
    with torch.no_grad():
        b.fill_(float(i))
    vpeft.save_adapter(model, sys.argv[1])
    print(i, flush=True)
"""


def test_sigkill_while_saving_an_adapter_leaves_a_complete_one(tmp_path):
    adapter = tmp_path / "adapter"
    for delay in (0.0, 0.013, 0.029, 0.047, 0.071):  # different points of the write cycle
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(adapter)], env=ENV, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        first = int(proc.stdout.readline())  # one save has completed
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model = tiny_vit()
        vpeft.load_adapter(model, adapter)
        value = model.blocks[0].attn.qkv.adapters["default"]["q"].lora_B
        assert value.unique().numel() == 1 and int(value[0, 0]) >= first  # one whole saved state, not a mix
