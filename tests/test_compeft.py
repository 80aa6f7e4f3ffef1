"""ComPEFT (vpeft.compress) against direct computations: the kept entries are the top-k of |tau| and carry the sign
of tau times one scale alpha * std(tau); the files round-trip bit for bit and are 8x+ smaller than float32; and
tools/compeft.py on a tiny text run rebuilds the run's initial adapter exactly (B = 0 before training) and scores
the compressed adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vpeft.compress import compress, decompress, load_compressed, save_compressed, stored_bytes
from vpeft.errors import ConfigError, DataError


def states(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    init = {
        "a.lora_A": torch.randn(4, 10, generator=g),
        "a.lora_B": torch.zeros(6, 4),
        "frozen": torch.randn(3, generator=g),
    }
    tuned = {k: v.clone() for k, v in init.items()}
    tuned["a.lora_A"] += 0.1 * torch.randn(4, 10, generator=g)
    tuned["a.lora_B"] += 0.5 * torch.randn(6, 4, generator=g)
    return tuned, init


@pytest.mark.parametrize("density", [0.05, 0.2, 1.0])
def test_global_ternary_code_is_topk_sign_times_alpha_sigma(density):
    tuned, init = states()
    comp = compress(tuned, init, density, alpha=2.0)
    assert comp.keys == ["a.lora_A", "a.lora_B"]  # the unchanged tensor is not stored
    out = decompress(comp, init)
    tau = torch.cat([(tuned[k] - init[k]).flatten() for k in comp.keys]).double()
    k = max(1, round(density * tau.numel()))
    threshold = tau.abs().sort(descending=True).values[k - 1]
    expected = torch.where(tau.abs() >= threshold, torch.sign(tau) * 2.0 * tau.std(), torch.zeros_like(tau))
    got = torch.cat([(out[k] - init[k]).flatten() for k in comp.keys]).double()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert int((got != 0).sum()) == k
    assert torch.equal(out["frozen"], init["frozen"])


def test_per_tensor_scope_gives_each_tensor_its_own_topk_and_scale():
    tuned, init = states(1)
    comp = compress(tuned, init, 0.25, alpha=1.0, scope="tensor")
    out = decompress(comp, init)
    for key in comp.keys:
        tau = (tuned[key] - init[key]).flatten().double()
        delta = (out[key] - init[key]).flatten().double()
        assert int((delta != 0).sum()) == round(0.25 * tau.numel())
        nz = delta != 0
        torch.testing.assert_close(delta[nz].abs(), torch.full_like(delta[nz], float(tau.std())), rtol=1e-6, atol=1e-7)
        assert torch.equal(torch.sign(delta[nz]), torch.sign(tau[nz]))
        assert tau.abs()[nz].min() >= tau.abs()[~nz].max()


def test_files_round_trip_and_are_at_least_8x_smaller(tmp_path):
    g = torch.Generator().manual_seed(2)
    init = {"w.lora_A": torch.randn(8, 384, generator=g), "w.lora_B": torch.zeros(384, 8)}
    tuned = {
        "w.lora_A": init["w.lora_A"] + 0.01 * torch.randn(8, 384, generator=g),
        "w.lora_B": torch.randn(384, 8, generator=g),
    }
    comp = compress(tuned, init, 0.1)
    save_compressed(comp, tmp_path / "c")
    again = load_compressed(tmp_path / "c")
    assert np.array_equal(again.mask, comp.mask) and np.array_equal(again.signs, comp.signs)
    assert again.scales == comp.scales and again.keys == comp.keys
    for key, value in decompress(again, init).items():
        assert torch.equal(value, decompress(comp, init)[key])
    dense = sum(t.numel() * 4 for t in tuned.values())
    assert dense / stored_bytes(tmp_path / "c") >= 8


def test_exact_tensors_are_stored_as_they_are_and_the_rest_coded_without_them(tmp_path):
    tuned, init = states(3)
    tuned["head.weight"], init["head.weight"] = torch.randn(5, 6), torch.randn(5, 6)
    comp = compress(tuned, init, 0.2, alpha=1.5, exact=["head"])
    assert comp.keys == ["a.lora_A", "a.lora_B"] and list(comp.exact) == ["head.weight"]
    bare_tuned, bare_init = states(3)
    plain = compress(bare_tuned, bare_init, 0.2, alpha=1.5)
    assert np.array_equal(comp.mask, plain.mask) and comp.scales == plain.scales  # the head changes no code or scale
    save_compressed(comp, tmp_path / "c")
    out = decompress(load_compressed(tmp_path / "c"), init)
    assert torch.equal(out["head.weight"], tuned["head.weight"])
    for key in comp.keys:
        assert torch.equal(out[key], decompress(plain, bare_init)[key])
    with pytest.raises(ConfigError, match=r"exact: \['heads'\] name no tensor"):
        compress(tuned, init, 0.2, exact=["heads"])
    with pytest.raises(DataError, match="no update.*outside \\['a'\\]"):
        compress({**init, "a.lora_A": tuned["a.lora_A"]}, init, 0.2, exact=["a"])


def test_mistakes_are_one_clear_error(tmp_path):
    tuned, init = states()
    with pytest.raises(ConfigError, match="density"):
        compress(tuned, init, 0.0)
    with pytest.raises(ConfigError, match="alpha"):
        compress(tuned, init, 0.1, alpha=-1)
    with pytest.raises(DataError, match="no update"):
        compress(init, init, 0.1)
    with pytest.raises(DataError, match="different tensors"):
        compress({"x": torch.ones(2)}, init, 0.1)
    (tmp_path / "bad").mkdir()
    with pytest.raises(Exception, match="not a ComPEFT directory"):
        load_compressed(tmp_path / "bad")


def test_tool_rebuilds_the_initial_adapter_and_scores_the_compressed_one(tmp_path, one_thread):
    from tests.lm.test_text_tasks import bert_folder, classification_config, label_rows, write_jsonl
    from tools import compeft as tool
    from vpeft.core import read_adapter
    from vpeft.engine import train as engine

    bert = bert_folder(tmp_path / "bert")
    data = write_jsonl(tmp_path / "data", {"train": label_rows(24), "val": label_rows(6, 3), "test": label_rows(9, 5)})
    cfg = classification_config(tmp_path, f"hf:{bert}", data)
    engine.train(cfg, tmp_path / "run")
    init = tool.initial_adapter(tmp_path / "run")
    _, trained = read_adapter(tmp_path / "run" / "adapter")
    assert set(init) == set(trained)
    for key in init:
        if key.endswith("lora_B"):
            assert not init[key].any() and trained[key].any()  # zeros at init, trained away from zero
        if key.endswith("lora_A"):  # the same seeded draw: training moved A by far less than its size
            assert (trained[key] - init[key]).norm() < 0.5 * init[key].norm()
    assert (
        tool.main([str(tmp_path / "run"), "--out", str(tmp_path / "c"), "--density", "0.2", "--alphas", "1", "2"]) == 0
    )
    report = json.loads((tmp_path / "c" / "compeft_report.json").read_text())
    assert report["alpha"] in (1.0, 2.0)  # the tiny adapter's file is mostly its key names: no size claim here
    assert report["bytes_compressed"] == sum(p.stat().st_size for p in (tmp_path / "c" / "compeft").iterdir())
    assert set(report["test_compressed"]) >= {"accuracy"}
    assert (tmp_path / "c" / "run" / "adapter").is_dir()
