"""vpeft backbones in OpenMMLab's model registry (an optional extra: skipped without mmseg).

Built exactly as the module docstring says, through mmengine's root ``MODELS``, with no registry state touched.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmseg.registry")

from mmengine.registry import MODELS  # noqa: E402

import vpeft.integrations.mmseg as vpeft_mmseg  # noqa: E402
from vpeft.backbones import TimmBackbone  # noqa: E402

from ..conftest import tiny_vit  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def test_built_from_a_config_dict_as_documented(tmp_path, images):
    reference = TimmBackbone(tiny_vit())
    checkpoint = tmp_path / "vit.pth"
    torch.save(reference.model.state_dict(), checkpoint)
    cfg = dict(type="vpeft.Backbone", pretrained=str(checkpoint), method="lora", method_options=dict(r=4))
    module = MODELS.build({**cfg, **TINY, "out_indices": (0, 1)})
    assert isinstance(module, vpeft_mmseg.MMSegBackbone)
    module.init_weights()  # mmengine calls this; the loaded weights must survive it
    outs = module.eval()(images)
    assert isinstance(outs, tuple) and [o.shape for o in outs] == [(2, 64, 4, 4)] * 2
    for ours, theirs in zip(outs, reference.features(images, [0, 1]), strict=True):
        torch.testing.assert_close(ours, theirs)  # LoRA starts at zero: the pretrained features
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 2 * 2 * 4 * (64 + 64)


def test_mmseg_registry_reaches_the_vpeft_scope_through_the_root():
    from mmseg.registry import MODELS as MMSEG_MODELS

    # mmseg's registry looks a scoped name up in the root's children: vpeft's registry must be one of them
    assert MMSEG_MODELS.parent is MODELS and MODELS.children["vpeft"] is vpeft_mmseg.VPEFT_MODELS
    assert MODELS.get(vpeft_mmseg.NAME) is vpeft_mmseg.MMSegBackbone


def test_whole_mmseg_models_need_mmcv_compiled_ops_as_the_docstring_says():
    # in a fresh process: a failed import of mmseg.models leaves half-registered classes behind
    script = (
        "import vpeft.integrations.mmseg\n"
        "from mmseg.registry import MODELS\n"
        "MODELS.build(dict(type='vpeft.Backbone', name='vit_tiny_patch16_224', img_size=32, patch_size=8, "
        "embed_dim=64, depth=2, num_heads=2, out_indices=(0, 1)))\n"
        "print('built')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    if importlib.util.find_spec("mmcv._ext") is None:  # mmcv-lite, the pinned extra
        assert done.returncode == 1 and "No module named 'mmcv._ext'" in done.stderr
    else:
        assert done.returncode == 0 and done.stdout == "built\n", done.stderr[-2000:]


def test_bad_indices_fail_when_built():
    with pytest.raises(ValueError, match=r"feature indices \[0, 7\]"):
        MODELS.build({"type": "vpeft.Backbone", **TINY, "out_indices": (0, 7)})


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
