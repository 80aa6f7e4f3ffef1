"""The README's Python API snippet runs as written and its claims hold."""

from __future__ import annotations

import re
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def api_snippet() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1).splitlines()


def test_api_snippet_gives_the_same_outputs_after_load_adapter(tmp_path, monkeypatch, capsys):
    # The snippet line for line, with ViT-Tiny for ViT-Base (the same timm family and calls) so that it runs on CPU.
    lines = [line.replace("vit_base_patch16_224", "vit_tiny_patch16_224") for line in api_snippet()]
    train = next(i for i, line in enumerate(lines) if line.startswith("# ... train"))
    load = next(i for i, line in enumerate(lines) if "vpeft.load_adapter(model2" in line)
    torch.manual_seed(1)  # the "pretrained" file: a 1000-class checkpoint, so base_model() replaces the head
    pretrained = timm.create_model("vit_tiny_patch16_224", num_classes=1000).state_dict()
    save_file({k: v.contiguous() for k, v in pretrained.items()}, tmp_path / "vit_b16.safetensors")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec("\n".join(lines[:train]), scope)
    model = scope["model"]
    with torch.no_grad():  # what training does: every trainable tensor (LoRA's B starts at zero) moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    exec("\n".join(lines[train + 1 : load]), scope)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    model.eval()
    expected = model(x)
    before = scope["model2"].eval()(x)  # the base alone, with its own random 100-class head
    assert not torch.allclose(before, expected, atol=1e-3)
    exec(lines[load], scope)
    torch.testing.assert_close(scope["model2"](x), expected, rtol=1e-5, atol=1e-5)
    exec("\n".join(lines[load + 1 :]), scope)  # disabled, merge, unmerge, export: the rest runs too
    torch.testing.assert_close(scope["model2"](x), expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "out" / "peft" / "adapter_config.json").is_file()
    assert "lora" in capsys.readouterr().out.lower()
