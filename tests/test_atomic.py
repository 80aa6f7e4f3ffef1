"""Atomic writes: a crash in the middle of writing an adapter or a checkpoint leaves the previous file valid."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import vpeft
from vpeft.core import io  # the core module whose file writer the crash test replaces
from vpeft.files import atomic_write

from .conftest import tiny_vit


class Crash(Exception):
    pass


def test_crash_during_adapter_write_keeps_the_previous_adapter(tmp_path, images, monkeypatch):
    model = tiny_vit()
    vpeft.apply_method(model, "lora")
    with torch.no_grad():
        model.blocks[0].attn.qkv.adapters["default"]["q"].lora_B.fill_(0.1)
    vpeft.save_adapter(model, tmp_path / "a")
    expected = model(images)
    with torch.no_grad():
        model.blocks[0].attn.qkv.adapters["default"]["q"].lora_B.fill_(0.7)  # a newer state, never completely written

    def dies_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # half a file
        raise Crash

    monkeypatch.setattr(io, "save_file", dies_half_way)
    with pytest.raises(Crash):
        vpeft.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny_vit()
    vpeft.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(images), expected, rtol=0, atol=0)


def test_atomic_write_replaces_only_when_complete(tmp_path):
    def write(text: str, crash: bool = False):
        def writer(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)
            if crash:
                raise Crash

        return writer

    target = tmp_path / "file.txt"
    atomic_write(target, write("first"))
    with pytest.raises(Crash):
        atomic_write(target, write("sec", crash=True))
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]
    atomic_write(target, write("second"))
    assert target.read_text() == "second"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_follows_the_umask_as_open_does(tmp_path, umask):
    """A shared run directory stays readable by the group: the same mode as a plain ``open(path, "w")``."""
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "atomic.txt", lambda tmp: Path(tmp).write_text("x"))
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask
