"""Hugging Face PEFT interop: vpeft LoRA exported to PEFT LoRA directories, and PEFT directories imported.

Checked against the installed ``peft`` itself: ``PeftModel.from_pretrained`` on an exported directory must give the
vpeft model's logits, and an adapter that ``peft`` saved must import to the peft model's logits.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

import vpeft
from vpeft.core import adapter_names, adapter_record, adapter_tensors
from vpeft.core.inject import state_of  # the core's own state: that an error leaves none behind
from vpeft.errors import ConfigError, DataError, MissingFileError
from vpeft.interop.hf_peft import SIDECAR_FILE
from vpeft.methods import METHODS

from .conftest import tiny_vit

peft = pytest.importorskip("peft")

ATOL = 1e-5


def perturb(model: torch.nn.Module, seed: int = 2) -> None:
    """Move every trainable tensor (LoRA A and B, the head copy) away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def adapted(method: str = "lora", **options) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, method, **options)
    perturb(model)
    return base, model.eval()


def peft_load(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_export_fused_qv_loads_in_peft(images, tmp_path):
    base, model = adapted("lora")  # defaults: r=8 on the q and v slices of each fused qkv, plus the head
    out = vpeft.export_hf_peft(model, tmp_path / "hf")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert config["target_modules"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert config["modules_to_save"] == ["head"]
    assert config["r"] == 16 and config["lora_alpha"] / config["r"] == pytest.approx(1.0)  # vpeft scale 8/8
    assert config["lora_dropout"] == pytest.approx(0.1)

    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.blocks.0.attn.qkv.lora_A.weight"].shape == (16, 64)
    b = tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert b.shape == (192, 16)
    assert not b[64:128].any() and not b[:64, 8:].any() and not b[128:, :8].any()  # k rows and off-blocks zero
    assert "base_model.model.head.weight" in tensors

    hf = peft_load(base, out)
    diff = max_diff(hf(images), model(images))
    assert diff <= ATOL, diff
    assert max_diff(model(images), base(images)) > 1e-3  # the adapter really changes the output


@torch.no_grad()
def test_export_whole_modules_loads_in_peft(images, tmp_path):
    base, model = adapted("lora", targets=["attn.proj", "mlp.fc1"], r=4, alpha=16.0)
    vpeft.export_hf_peft(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == [f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.proj", "mlp.fc1")]
    diff = max_diff(peft_load(base, tmp_path / "hf")(images), model(images))
    assert diff <= ATOL, diff


@torch.no_grad()
def test_export_mixed_ranks_uses_rank_pattern(images, tmp_path):
    # q,v slices (rank 2r on qkv), whole proj (rank r) and a Conv2d (patch embedding)
    base, model = adapted("lora", targets=["q", "v", "attn.proj", "patch_embed.proj"], r=4, alpha=8.0)
    vpeft.export_hf_peft(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {"blocks.0.attn.qkv": 8, "blocks.1.attn.qkv": 8}
    assert config["alpha_pattern"] == {"blocks.0.attn.qkv": 16, "blocks.1.attn.qkv": 16}
    diff = max_diff(peft_load(base, tmp_path / "hf")(images), model(images))
    assert diff <= ATOL, diff


@pytest.mark.skipif("dora" not in METHODS, reason="vpeft has no 'dora' method")
@torch.no_grad()
def test_export_dora_loads_in_peft(images, tmp_path):
    base, model = adapted("dora")
    vpeft.export_hf_peft(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "adapter_config.json").read_text())["use_dora"] is True
    diff = max_diff(peft_load(base, tmp_path / "hf")(images), model(images))
    assert diff <= ATOL, diff
    fresh = copy.deepcopy(base)
    vpeft.import_hf_peft(fresh, tmp_path / "hf")
    assert max_diff(fresh(images), model(images)) == 0


@torch.no_grad()
def test_export_import_round_trip(images, tmp_path):
    base, model = adapted("lora")
    vpeft.export_hf_peft(model, tmp_path / "hf")
    fresh = copy.deepcopy(base)
    report = vpeft.import_hf_peft(fresh, tmp_path / "hf", adapter_name="again")
    record, original = adapter_record(fresh, "again"), adapter_record(model, "default")
    assert record.method == "lora" and record.targets == original.targets and record.heads == ["head"]
    assert record.config == original.config  # the exported options, sliced targets and all
    saved = dict(adapter_tensors(model, "default"))
    for key, value in adapter_tensors(fresh, "again").items():
        assert torch.equal(value, saved[key]), key
    assert report.trainable == vpeft.report(model).trainable
    assert max_diff(fresh(images), model(images)) == 0


@torch.no_grad()
def test_import_without_sidecar_is_whole_module(images, tmp_path):
    base, model = adapted("lora")
    vpeft.export_hf_peft(model, tmp_path / "hf")
    (tmp_path / "hf" / SIDECAR_FILE).unlink()
    fresh = copy.deepcopy(base)
    vpeft.import_hf_peft(fresh, tmp_path / "hf")
    assert adapter_record(fresh, "default").targets == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    diff = max_diff(fresh(images), model(images))
    assert diff <= ATOL, diff


def _peft_saved(tmp_path: Path, **lora_options) -> tuple[torch.nn.Module, torch.nn.Module, Path]:
    """A tiny ViT adapted and saved by Hugging Face PEFT itself, with non-zero (perturbed) LoRA tensors."""
    base = tiny_vit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora_options))
    perturb(hf, seed=3)
    directory = tmp_path / "peft_saved"
    hf.save_pretrained(str(directory))
    assert not (directory / SIDECAR_FILE).exists()
    return base, hf.eval(), directory


@torch.no_grad()
def test_import_adapter_saved_by_peft(images, tmp_path):
    base, hf, directory = _peft_saved(
        tmp_path, r=4, lora_alpha=8, target_modules=["qkv", "fc1"], lora_dropout=0.05, modules_to_save=["head"]
    )
    model = copy.deepcopy(base)
    report = vpeft.import_hf_peft(model, directory)
    record = adapter_record(model, "default")
    assert sorted(record.targets) == sorted(f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.qkv", "mlp.fc1"))
    assert record.heads == ["head"] and record.config.r == 4 and record.config.alpha == pytest.approx(8.0)
    assert report.trainable == 2 * 4 * ((64 + 192) + (64 + 256))
    diff = max_diff(model(images), hf(images))
    assert diff <= ATOL, diff
    assert max_diff(model(images), base(images)) > 1e-3
    with vpeft.disabled(model):
        torch.testing.assert_close(model(images), base(images), rtol=0, atol=0)


@torch.no_grad()
def test_import_peft_rslora(images, tmp_path):
    base, hf, directory = _peft_saved(tmp_path, r=4, lora_alpha=4, use_rslora=True, target_modules=["proj"])
    model = copy.deepcopy(base)
    vpeft.import_hf_peft(model, directory)
    diff = max_diff(model(images), hf(images))
    assert diff <= ATOL, diff


@torch.no_grad()
def test_import_per_module_ranks_is_refused(images, tmp_path):
    base, _, directory = _peft_saved(tmp_path, r=4, target_modules=["qkv", "fc1"], rank_pattern={"fc1": 2})
    model = copy.deepcopy(base)
    with pytest.raises(DataError, match="different ranks"):
        vpeft.import_hf_peft(model, directory)
    assert state_of(model, required=False) is None  # nothing half-built
    torch.testing.assert_close(model(images), base(images), rtol=0, atol=0)


def test_export_non_lora_method_is_refused(tmp_path):
    _, model = adapted("bitfit")
    with pytest.raises(ConfigError, match="method 'bitfit'.*LoRA family"):
        vpeft.export_hf_peft(model, tmp_path / "hf")
    assert not (tmp_path / "hf" / "adapter_config.json").exists()


def test_export_lora_on_multihead_attention_is_refused(tmp_path):
    model = torch.nn.Sequential()
    model.add_module("attn", torch.nn.MultiheadAttention(16, 2, batch_first=True))
    vpeft.apply_method(model, "lora", targets=["attn[q,v]"], head=())
    with pytest.raises(ConfigError, match="MultiheadAttention 'attn'"):
        vpeft.export_hf_peft(model, tmp_path / "hf")


def test_import_empty_directory(tmp_path, vit):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="not a Hugging Face PEFT adapter directory"):
        vpeft.import_hf_peft(vit, tmp_path / "empty")
    assert state_of(vit, required=False) is None


def test_import_refuses_pickles(tmp_path, vit):
    directory = tmp_path / "bin"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["qkv"]})
    )
    (directory / "adapter_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(DataError, match="never unpickles"):
        vpeft.import_hf_peft(vit, directory)
    assert state_of(vit, required=False) is None


def test_import_non_lora_peft_type(tmp_path, vit):
    _, model = adapted("lora")
    vpeft.export_hf_peft(model, tmp_path / "hf")
    config_path = tmp_path / "hf" / "adapter_config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), peft_type="IA3")))
    with pytest.raises(DataError, match="only Hugging Face PEFT LORA"):
        vpeft.import_hf_peft(vit, tmp_path / "hf")


def test_import_names_a_corrupt_config_file(tmp_path, vit):
    _, model = adapted("lora")
    vpeft.export_hf_peft(model, tmp_path / "hf")
    (tmp_path / "hf" / "adapter_config.json").write_text('{"peft_type": "LORA", ')  # cut off mid-write
    with pytest.raises(DataError, match=r"adapter_config.json does not hold a JSON object"):
        vpeft.import_hf_peft(vit, tmp_path / "hf")
    assert state_of(vit, required=False) is None


def test_import_into_wrong_model_leaves_it_unchanged(tmp_path, images):
    _, model = adapted("lora", targets=["attn.proj"])
    vpeft.export_hf_peft(model, tmp_path / "hf")
    (tmp_path / "hf" / SIDECAR_FILE).unlink()
    other = tiny_vit(num_classes=7)  # same targets, another head shape
    expected = other(images)
    with pytest.raises(ValueError, match="does not fit"):
        vpeft.import_hf_peft(other, tmp_path / "hf")
    assert state_of(other, required=False) is None
    torch.testing.assert_close(other(images), expected, rtol=0, atol=0)


def test_import_keeps_existing_adapter(tmp_path):
    base, model = adapted("lora")
    vpeft.export_hf_peft(model, tmp_path / "hf")
    with pytest.raises(ConfigError, match="already has an adapter named 'default'"):
        vpeft.import_hf_peft(model, tmp_path / "hf")
    assert adapter_names(model) == ["default"]


@torch.no_grad()
def test_export_lora_on_bert_loads_in_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=100, num_labels=3
    )
    base = transformers.BertForSequenceClassification(config).eval()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "lora", targets=["q", "v", "mlp_out"])
    perturb(model)
    vpeft.export_hf_peft(model, tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"] and len(saved["target_modules"]) == 6
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    hf = peft_load(base, tmp_path / "hf")
    diff = max_diff(hf(input_ids=ids).logits, model(input_ids=ids).logits)
    assert diff <= ATOL, diff
    fresh = copy.deepcopy(base)
    vpeft.import_hf_peft(fresh, tmp_path / "hf")
    assert max_diff(fresh(input_ids=ids).logits, model(input_ids=ids).logits) == 0


@torch.no_grad()
def test_sidecar_options_that_do_not_resolve_fall_back_to_exported_targets(images, tmp_path):
    base, model = adapted("lora", targets=["attn.qkv[q,v]"], layers=[1])
    vpeft.export_hf_peft(model, tmp_path / "hf")
    sidecar_path = tmp_path / "hf" / SIDECAR_FILE
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["options"]["targets"] = ["mlp.fc2"]  # resolves, but to other modules than the exported ones
    sidecar_path.write_text(json.dumps(sidecar))
    fresh = copy.deepcopy(base)
    vpeft.import_hf_peft(fresh, tmp_path / "hf")
    assert adapter_record(fresh, "default").targets == ["blocks.1.attn.qkv[q]", "blocks.1.attn.qkv[v]"]
    assert max_diff(fresh(images), model(images)) == 0


@torch.no_grad()
def test_stale_sidecar_is_ignored(images, tmp_path):
    from safetensors.torch import load_file, save_file

    base, model = adapted("lora")
    vpeft.export_hf_peft(model, tmp_path / "hf")
    weights = tmp_path / "hf" / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", "saved": "again"})  # e.g. by PEFT
    fresh = copy.deepcopy(base)
    vpeft.import_hf_peft(fresh, tmp_path / "hf")
    assert adapter_record(fresh, "default").targets == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert max_diff(fresh(images), model(images)) <= ATOL
