"""The causal-LM task data-parallel: a step's loss is the mean over all its answer tokens, however they fall on the
micro-batches and the processes, so two torchrun processes (gloo, CPU) under FSDP or DDP train what one process
trains on the same global batches, evaluate the same, resume exactly, and ``tools/test.py`` reopens the run.

The answers are 1 to 5 words long (2 to 6 tokens with the end token): a mean of per-process or per-micro-batch means
would weigh a short answer's tokens more than a long one's, and the first test shows by how much it would differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from vpeft.engine import train as engine
from vpeft.engine.config import load_config

from .test_fsdp import ROOT, steps, torchrun
from .test_train import records

text = pytest.importorskip("tests.lm.test_text_tasks")


def rows(n: int, offset: int) -> list[dict]:
    """Prompts whose answers are 1 to 5 words long, in a mixed order."""
    out = []
    for i in range(n):
        words = [text.WORDS[5 + (3 * i + j + offset) % 20] for j in range(1 + (7 * i + offset) % 5)]
        out.append({"prompt": f"what is the base of {text.WORDS[5 + (i + offset) % 20]}", "answer": " ".join(words)})
    return out


@pytest.fixture(scope="module")
def lm_config(tmp_path_factory) -> Path:
    """LoRA on the tiny Llama folder, 16 training items (4 steps an epoch at a global batch of 4), 5 val and 7 test
    items (odd: two processes get shares of different sizes). No dropout: nothing random inside a step, so runs
    differ only in the order of sums and in padding widths."""
    root = tmp_path_factory.mktemp("lm")
    model = text.llama_folder(root / "llama")
    data = text.write_jsonl(root / "data", {"train": rows(16, 0), "val": rows(5, 1), "test": rows(7, 2)})
    path = root / "lm.yaml"
    path.write_text(f"""
task: causal_lm
model: {{name: "hf:{model}"}}
method: {{name: lora, r: 4, dropout: 0.0}}
data: {{name: jsonl, root: "{data}", batch_size: 4, num_workers: 0, options: {{max_new_tokens: 6}}}}
optim: {{lr: 1.0e-2}}
train: {{epochs: 2, log_every: 1, tensorboard: false, seed: 0, device: cpu}}
""")
    return path


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_a_step_loss_is_the_token_mean_of_the_global_batch_also_over_micro_batches(tmp_path, lm_config, one_thread):
    cfg = load_config(lm_config, ["train.max_steps=2"])
    whole = engine.train(cfg, tmp_path / "whole")
    micro = engine.train(load_config(lm_config, ["train.max_steps=2", "data.batch_size=2", "optim.accumulate=2"]),
                         tmp_path / "micro")  # fmt: skip
    assert whole["steps"] == micro["steps"] == 2

    # by hand: the base model (LoRA starts as the identity) on each item of the first global batch alone, unpadded
    task, model, datasets = text.built(cfg)
    first = list(engine._loader(cfg, task, datasets["train"], True).sampler)[:4]
    nll, counts = [], []
    with torch.no_grad():
        for index in first:
            prompt, answer = task.encode(*datasets["train"][index])
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
            nll.append(F.cross_entropy(logits, torch.tensor(answer), reduction="sum").item())
            counts.append(len(answer))
    token_mean = sum(nll) / sum(counts)
    halves = (sum(nll[:2]) / sum(counts[:2]) + sum(nll[2:]) / sum(counts[2:])) / 2  # a mean of micro-batch means
    assert len(set(counts)) > 1 and abs(halves - token_mean) > 1e-4  # the data tells the two apart
    a, b = steps(tmp_path / "whole"), steps(tmp_path / "micro")
    assert a[0]["loss"] == pytest.approx(token_mean, rel=1e-6)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)
    solo, accumulated = adapter(tmp_path / "whole"), adapter(tmp_path / "micro")
    for key, value in solo.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_fsdp_and_ddp_over_two_processes_train_and_evaluate_the_causal_lm_as_one(tmp_path, lm_config, one_thread):
    one = engine.train(load_config(lm_config), tmp_path / "one")
    # FSDP: 1 item per micro-batch, 2 micro-batches a step, in each of 2 processes (the same 4 items a step as one
    # process's batch of 4: strided shards of one permutation); killed after epoch 1 and resumed in the same processes
    # (tests/engine/fsdp_lm.py). Evaluation at 1 item a batch: of 7 test items one process gets 4, the other 3.
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    done = torchrun(str(ROOT / "tests" / "engine" / "fsdp_lm.py"), str(lm_config), str(fsdp),
                    "train.parallel=fsdp", "data.batch_size=1", "optim.accumulate=2")  # fmt: skip
    assert f"resumed {fsdp} at epoch 1, step 4" in done.stderr
    torchrun(str(ROOT / "tools" / "train.py"), str(lm_config), "--work-dir", str(ddp),
             "--set", "train.parallel=ddp", "data.batch_size=2")  # fmt: skip
    solo = adapter(tmp_path / "one")
    expected = steps(tmp_path / "one")
    assert len(expected) == 8 and expected[-1]["loss"] < expected[0]["loss"]
    # tolerances: float32 sums in another order and other padding widths (a process pads to its own longest item);
    # measured on a 2-core CPU: losses within 5e-7, adapter tensors within 1.2e-7 (|values| up to 0.21). A mean of
    # the processes' or micro-batches' own token means (the weighting before) misses by 1.6e-2 to 2.4e-2 in the loss
    # and 4e-2 to 5.7e-2 in the adapter
    for run in (fsdp, ddp):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["processes"] == 2 and summary["steps"] == 8
        got = steps(run)
        assert [r["step"] for r in got] == list(range(1, 9))
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-6), run.name
        files = adapter(run)
        assert sorted(files) == sorted(solo) and len(solo) == 8  # LoRA A and B on q and v of 2 layers
        for key, value in solo.items():  # 8 AdamW steps from the same start: the same tensors up to rounding
            torch.testing.assert_close(files[key], value, rtol=1e-4, atol=1e-6, msg=f"{run.name}: {key}")
        # validation and test sums over the two uneven shares: the one-process numbers
        for split in ("val", "test"):
            mine = [r for r in records(run) if r.get("split") == split]
            theirs = [r for r in records(tmp_path / "one") if r.get("split") == split]
            assert len(mine) == len(theirs) > 0
            for x, y in zip(mine, theirs, strict=True):
                assert x["exact_match"] == y["exact_match"], (run.name, split)
                assert x["loss"] == pytest.approx(y["loss"], rel=1e-6), (run.name, split)

    # the sharded model decodes in step: rank 0 stopped after one new token while rank 1 went on to max_new_tokens
    # (6), and each reply is the unsharded model's
    generated = json.loads((fsdp / "generated.json").read_text())
    assert [g["sharded"] for g in generated] == [g["alone"] for g in generated]
    assert len(generated[0]["alone"].split()) <= 1 < len(generated[1]["alone"].split())

    import tools.test as test_tool  # one process reopens the FSDP run: its adapter gives the run's own test numbers

    test_tool.main([str(fsdp)])
    again = json.loads((fsdp / "test_metrics.json").read_text())
    assert again["exact_match"] == one["test"]["exact_match"]
    assert again["loss"] == pytest.approx(one["test"]["loss"], rel=1e-6)
