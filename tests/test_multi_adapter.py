"""Several named adapters on one backbone, each with its own head (multi-task use)."""

from __future__ import annotations

import copy

import torch

import vpeft

from .conftest import perturb, tiny_vit


def two_task_model() -> tuple[torch.nn.Module, torch.nn.Module]:
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "lora", adapter_name="cars")
    perturb(model)
    vpeft.apply_method(model, "bitfit", adapter_name="birds")  # shares the qkv wrapper with lora
    perturb(model)
    return base, model


def test_switching_switches_adapter_and_head(images):
    base, model = two_task_model()
    birds = model(images)
    vpeft.set_adapter(model, "cars")
    cars = model(images)
    assert not torch.allclose(cars, birds)
    with vpeft.disabled(model):
        torch.testing.assert_close(model(images), base(images), rtol=0, atol=0)
    heads = model.head.adapters
    assert not torch.equal(heads["cars"]["all"].weight, heads["birds"]["all"].weight)


def test_only_the_active_adapter_trains(images):
    _, model = two_task_model()
    vpeft.set_adapter(model, "cars")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.cars." in n for n in trainable)
    model(images).sum().backward()
    frozen_grads = [n for n, p in model.named_parameters() if ".adapters.birds." in n and p.grad is not None]
    assert not frozen_grads
    assert vpeft.report(model).trainable == 2 * 2 * 8 * (64 + 64)


def test_each_adapter_saves_and_loads_by_name(images, tmp_path):
    base, model = two_task_model()
    expected = {}
    for name in ("cars", "birds"):
        vpeft.set_adapter(model, name)
        expected[name] = model(images)
        vpeft.save_adapter(model, tmp_path / name)
    fresh = copy.deepcopy(base)
    vpeft.load_adapter(fresh, tmp_path / "birds")
    vpeft.load_adapter(fresh, tmp_path / "cars", adapter_name="cars_again")
    torch.testing.assert_close(fresh(images), expected["cars"], rtol=0, atol=0)
    vpeft.set_adapter(fresh, "birds")
    torch.testing.assert_close(fresh(images), expected["birds"], rtol=0, atol=0)


def test_deleting_adapters_restores_the_plain_model(images):
    base, model = two_task_model()
    vpeft.delete_adapter(model, "birds")
    assert vpeft.report(model).adapter == "cars"
    vpeft.delete_adapter(model, "cars")
    assert set(model.state_dict()) == set(base.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(images), base(images), rtol=0, atol=0)
