"""vpeft backbones in mmsegmentation's MODELS registry (an optional extra: skipped without mmseg)."""

from __future__ import annotations

import builtins
import importlib
import sys

import pytest
import torch

pytest.importorskip("mmseg.registry")

from mmseg.registry import MODELS  # noqa: E402

import vpeft.integrations.mmseg as vpeft_mmseg  # noqa: E402
from vpeft.backbones import TimmBackbone  # noqa: E402

from ..conftest import tiny_vit  # noqa: E402

TINY = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


@pytest.fixture
def registry(monkeypatch):
    # mmseg's registry imports mmseg.models on first build, which needs mmcv's compiled ops (absent with mmcv-lite);
    # mark its locations imported so the build looks up only what is registered, vpeft.Backbone included
    monkeypatch.setattr(MODELS, "_imported", True)
    return MODELS


def test_built_from_an_mmseg_config_dict(registry, tmp_path, images):
    reference = TimmBackbone(tiny_vit())
    checkpoint = tmp_path / "vit.pth"
    torch.save(reference.model.state_dict(), checkpoint)
    cfg = dict(type="vpeft.Backbone", pretrained=str(checkpoint), method="lora", method_options=dict(r=4))
    module = registry.build({**cfg, **TINY, "out_indices": (0, 1)})
    assert isinstance(module, vpeft_mmseg.MMSegBackbone)
    module.init_weights()  # mmengine calls this; the loaded weights must survive it
    outs = module.eval()(images)
    assert isinstance(outs, tuple) and [o.shape for o in outs] == [(2, 64, 4, 4)] * 2
    for ours, theirs in zip(outs, reference.features(images, [0, 1]), strict=True):
        torch.testing.assert_close(ours, theirs)  # LoRA starts at zero: the pretrained features
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 2 * 2 * 4 * (64 + 64)


def test_bad_indices_fail_when_built(registry):
    with pytest.raises(ValueError, match=r"feature indices \[0, 7\]"):
        registry.build({"type": "vpeft.Backbone", **TINY, "out_indices": (0, 7)})


def test_missing_mmseg_gives_an_install_hint(monkeypatch):
    real_import = builtins.__import__

    def no_mmseg(name, *args, **kwargs):
        if name.startswith("mmseg"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mmseg)
    monkeypatch.delitem(sys.modules, "vpeft.integrations.mmseg")
    with pytest.raises(ImportError, match=r"needs mmsegmentation.*pip install 'vpeft\[mmseg\]'"):
        importlib.import_module("vpeft.integrations.mmseg")
