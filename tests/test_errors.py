"""Bad input gets a clear error that names what is wrong, and the model is left exactly as it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import vpeft

from .conftest import tiny_vit


def snapshot(model: torch.nn.Module) -> tuple[dict, dict, dict]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, flags, dict(model.named_modules())


def assert_unchanged(model: torch.nn.Module, before: tuple[dict, dict, dict]) -> None:
    state, flags, modules = before
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert dict(model.named_modules()).keys() == modules.keys()
    assert "_vpeft" not in model.__dict__


@pytest.mark.parametrize(
    "method, options, error, message",
    [
        ("lorra", {}, KeyError, r"unknown method 'lorra'.*Did you mean 'lora'"),
        ("lora", {"rank": 4}, TypeError, r"no option 'rank'.*Valid options: .*\br\b"),
        ("lora", {"r": "8"}, TypeError, r"option 'r' must be int, got '8'"),
        ("lora", {"r": 0}, ValueError, r"r must be >= 1"),
        ("lora", {"targets": ["atn.qkv"]}, ValueError, r"target 'atn.qkv' matches no module.*attn\.qkv \(Linear\)"),
        ("lora", {"targets": ["norm1"]}, ValueError, r"matched 'blocks.0.norm1' \(LayerNorm\).*adapts only linear"),
        ("lora", {"targets": ["mlp.fc1[q]"]}, ValueError, r"no slice 'q'"),
        ("lora", {"targets": ["attn.qkv[x]"]}, ValueError, r"no slice 'x'; its slices are \['q', 'k', 'v'\]"),
        ("lora", {"exclude": ["nothing.here"]}, ValueError, r"exclude pattern 'nothing.here' matches no module"),
        ("lora", {"layers": [5]}, ValueError, r"layers \[5\] hold no target.*blocks \[0, 1\]"),
        ("lora", {"head": ["classifier"]}, ValueError, r"head pattern 'classifier' matches no module"),
        ("lora", {"targets": ["blocks.(0"]}, ValueError, r"not a valid regular expression"),
        ("lora", {"target_types": ["Conv3d"]}, ValueError, r"target_types \['Conv3d'\] match no module"),
    ],
)
def test_bad_options_leave_model_unchanged(method, options, error, message):
    model = tiny_vit()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        vpeft.apply_method(model, method, **options)
    assert_unchanged(model, before)


def test_applying_twice_names_the_adapter():
    model = tiny_vit()
    vpeft.apply_method(model, "lora")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"already has an adapter named 'default' \(lora\)"):
        vpeft.apply_method(model, "bitfit")
    assert set(model.state_dict()) == set(state)


def test_calibration_required_is_explained():
    from vpeft.core import AdapterModule, MethodConfig
    from vpeft.methods import METHODS

    class NeedsData(AdapterModule):
        Config = MethodConfig
        needs_calibration = True
        needs_targets = False

    METHODS["needs_data"] = NeedsData
    try:
        model = tiny_vit()
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"needs calibration data: .*calibration=batches"):
            vpeft.apply_method(model, "needs_data")
        assert_unchanged(model, before)
    finally:
        del METHODS["needs_data"]


def test_load_into_other_architecture_names_tensor_and_shapes(tmp_path):
    model = tiny_vit()
    vpeft.apply_method(model, "lora")
    vpeft.save_adapter(model, tmp_path / "a")
    wider = timm_vit(embed_dim=96)
    before = snapshot(wider)
    with pytest.raises(
        ValueError, match=r"shape mismatches.*blocks.0.attn.qkv.q.lora_A: saved \(8, 64\), model \(8, 96\)"
    ):
        vpeft.load_adapter(wider, tmp_path / "a")
    assert_unchanged(wider, before)


def test_load_with_other_head_size_is_refused(tmp_path):
    model = tiny_vit()
    vpeft.apply_method(model, "lora")
    vpeft.save_adapter(model, tmp_path / "a")
    other = tiny_vit(num_classes=5)
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"head.weight: saved \(10, 64\), model \(5, 64\)"):
        vpeft.load_adapter(other, tmp_path / "a")
    assert_unchanged(other, before)


def test_load_missing_and_unexpected_tensors(tmp_path):
    model = tiny_vit()
    vpeft.apply_method(model, "lora")
    vpeft.save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    meta["options"]["targets"] = ["q"]  # the file holds v tensors that this config does not build
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(meta))
    fresh = tiny_vit()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"tensors in the file have no place in the model.*attn\.qkv\.v\.lora_A"):
        vpeft.load_adapter(fresh, tmp_path / "a")
    assert_unchanged(fresh, before)


def test_load_rejects_non_adapter_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vpeft adapter directory"):
        vpeft.load_adapter(tiny_vit(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="Hugging Face PEFT adapter: use vpeft.import_hf_peft"):
        vpeft.load_adapter(tiny_vit(), tmp_path)


def test_merge_refusals_leave_adapters_working():
    model = tiny_vit()
    vpeft.apply_method(model, "lora")
    vpeft.apply_method(model, "bitfit", adapter_name="second")
    x = torch.randn(1, 3, 32, 32)
    y = model(x)
    with pytest.raises(ValueError, match=r"delete the others first"):
        vpeft.merge(model)
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not merged"):
        vpeft.unmerge(model)


def test_functions_on_a_plain_model_explain():
    with pytest.raises(ValueError, match="no vpeft adapter; call vpeft.apply_method"):
        vpeft.merge(tiny_vit())


def timm_vit(**kwargs) -> torch.nn.Module:
    import timm

    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10) | kwargs
    return timm.models.vision_transformer.VisionTransformer(**args).eval()


def test_copy_of_adapted_model_is_independent():
    model = tiny_vit()
    vpeft.apply_method(model, "lora")
    twin = copy.deepcopy(model)
    vpeft.set_adapter(twin, "default")
    with vpeft.disabled(twin):
        assert twin.__dict__["_vpeft"].switch.disabled and not model.__dict__["_vpeft"].switch.disabled
