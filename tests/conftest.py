"""Shared fixtures: tiny random-weight models (depth 2, width 64, 32x32 images) so the suite runs on 2 CPU cores."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch

from vpeft.data.system import system_data
from vpeft.engine import train as engine


class Interrupt(Exception):
    """A training run killed from outside, as by a crash or Ctrl-C (raised by :func:`killed_at_epoch`)."""


@contextlib.contextmanager
def killed_at_epoch(epoch: int = 1) -> Iterator[None]:
    """The training run inside dies when it builds the training loader of ``epoch`` (0-based), so the checkpoint of
    the epoch before is the last one written; the block must end in that ``Interrupt``."""
    real_loader = engine._loader

    def dying_loader(cfg, task, dataset, train, dist=None, at=0):
        if train and at == epoch:
            raise Interrupt
        return real_loader(cfg, task, dataset, train, dist, at)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Interrupt):
        patch.setattr(engine, "_loader", dying_loader)
        yield


def perturb(model: torch.nn.Module) -> None:
    """Move every trainable tensor off its initial value, so that save, merge and disable see a real update."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def tiny_vit(num_classes: int = 10, **kwargs) -> torch.nn.Module:
    """A random-weight timm ViT: 2 blocks, width 64, 4x4 grid of 8-pixel patches plus a class token."""
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=num_classes, **kwargs
    )
    return model.eval()


@pytest.fixture
def vit() -> torch.nn.Module:
    return tiny_vit()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def vit_b16() -> torch.nn.Module:
    """Random-weight ViT-B/16 with a 100-class head, for parameter counts; tests adapt copies (copy.deepcopy)."""
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", num_classes=100).eval()


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread than on two that contend on a shared machine (short training tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def require_system_data(package: str) -> Path:
    """The data a Debian package of requirements/debian.txt installs; without it the test skips, naming the package.

    Under ``CI=true`` a missing package fails the test instead: tools/setup_env.sh installs every listed package, so a
    skip there would hide a broken install step behind a green run.
    """
    try:
        return system_data(package)
    except FileNotFoundError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{err} (CI=true: the set-up must have installed it)", pytrace=False)
        pytest.skip(str(err))
