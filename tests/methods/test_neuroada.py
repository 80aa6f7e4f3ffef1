"""NeuroAda against direct computations: the index is each row's top-k |W0| (sorted by hand), the forward and the
gradients are those of the dense ``W0 + scatter(theta)`` built entry by entry, the merge writes exactly those entries,
``k * out`` parameters per matrix, the index travels with the saved adapter, and the backward keeps no dense matrix."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import vpeft
from vpeft.core import adapted_modules, is_conv1d
from vpeft.errors import OptionError
from vpeft.methods.neuroada import _Bypass

from ..conftest import perturb
from ..lm.models import TINY_LMS, batches, task_loss
from ._two_layers import TwoLayers

pytestmark = pytest.mark.usefixtures("one_thread")


def dense(weight: torch.Tensor, index: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``W0 + scatter(theta)``, entry by entry."""
    out = weight.detach().clone()
    for i in range(index.shape[0]):
        for j in range(index.shape[1]):
            out[i, index[i, j]] += theta[i, j]
    return out


def test_index_is_each_row_s_top_k_magnitudes_and_forward_is_the_dense_update():
    torch.manual_seed(0)
    base = TwoLayers(d_in=9, hidden=7, d_out=5)
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "neuroada", targets=["fc1", "fc2"], k=3, head=[])
    perturb(model)
    x = torch.randn(4, 9)
    h = x
    for name in ("fc1", "fc2"):
        layer, ada = getattr(base, name), getattr(model, name).adapters["default"]["all"]
        by_hand = [
            sorted(sorted(range(row.numel()), key=lambda j: -abs(float(row[j])))[:3]) for row in layer.weight.detach()
        ]
        assert ada.neuroada_index.tolist() == by_hand
        assert ada.neuroada_delta.shape == (layer.out_features, 3)
        h = F.linear(h, dense(layer.weight, ada.neuroada_index, ada.neuroada_delta), layer.bias)
        h = torch.tanh(h) if name == "fc1" else h
    torch.testing.assert_close(model(x), h, rtol=1e-6, atol=1e-6)


def test_custom_backward_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    theta = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.randn(5, 6, generator=g).abs().topk(4, dim=1).indices
    assert torch.autograd.gradcheck(_Bypass.apply, (x, theta, index))


@pytest.mark.parametrize("lm", ["gpt2", "llama"])
def test_gradient_is_the_dense_weight_gradient_at_the_selected_entries(lm):
    """On GPT-2 (Conv1D weights stored (in, out), q/k/v slices of the fused c_attn) and Llama (GQA)."""
    base = TINY_LMS[lm]()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "neuroada", k=5)
    perturb(model)
    reference = copy.deepcopy(base).requires_grad_(True)
    views = []
    for adapted in adapted_modules(model, "default"):
        module = reference.get_submodule(adapted.path)
        for part, ada in adapted.parts.items():
            rows = adapted.slices.get(part, slice(None))
            views.append((module, rows, ada))
            with torch.no_grad():
                weight = (module.weight.T if is_conv1d(module) else module.weight)[rows]
                weight.copy_(dense(weight, ada.neuroada_index, ada.neuroada_delta))
    batch = batches(1, seed=7)[0]
    loss, ref_loss = task_loss(model, batch)[0], task_loss(reference, batch)[0]
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    for module, rows, ada in views:
        full = (module.weight.grad.T if is_conv1d(module) else module.weight.grad)[rows]
        torch.testing.assert_close(ada.neuroada_delta.grad, full.gather(1, ada.neuroada_index), rtol=0, atol=1e-6)


def test_count_is_k_times_out_per_matrix():
    report = vpeft.apply_method(TINY_LMS["llama"](), "neuroada")
    # per block: q 32, k 16, v 16 (GQA), o 32, up 64, down 32 neurons; k = 20 each
    assert report.trainable == 2 * 20 * (32 + 16 + 16 + 32 + 64 + 32) == 7_680


def test_merge_writes_exactly_the_selected_entries():
    base = TINY_LMS["gpt2"]()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "neuroada", k=4)
    perturb(model)
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for adapted in adapted_modules(model, "default"):
            module = expected.get_submodule(adapted.path)
            for part, ada in adapted.parts.items():
                weight = module.weight.T[adapted.slices.get(part, slice(None))]  # GPT-2: all Conv1D
                weight.copy_(dense(weight, ada.neuroada_index, ada.neuroada_delta))
    vpeft.merge(model)
    for (name, merged), (_, hand) in zip(model.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(merged, hand), name


def test_the_index_is_saved_and_loaded_with_the_adapter(tmp_path):
    base = TINY_LMS["llama"]()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "neuroada", k=2)
    perturb(model)
    vpeft.save_adapter(model, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert "model.layers.0.self_attn.q_proj.all.neuroada_index" in saved
    other = copy.deepcopy(base)  # other base weights pick other connections; loading restores the saved ones
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(torch.rand_like(p))
    vpeft.load_adapter(other, tmp_path / "a")
    layer = model.model.layers[1].mlp.down_proj.adapters["default"]["all"]
    loaded = other.model.layers[1].mlp.down_proj.adapters["default"]["all"]
    assert torch.equal(loaded.neuroada_index, layer.neuroada_index) and torch.equal(
        loaded.neuroada_delta, layer.neuroada_delta
    )


def test_the_backward_keeps_the_input_and_no_dense_matrix():
    layer = nn.Linear(48, 40)
    vpeft.apply_method(layer_holder := nn.Sequential(layer), "neuroada", targets=["0"], k=3, head=[])
    x = torch.randn(6, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer_holder(x)
    assert max(t.numel() for t in saved) == 48 * 40  # the frozen weight itself, which the base matmul keeps
    assert sum(t.numel() == 48 * 40 for t in saved) == 1 and any(t is x for t in saved)


def test_k_above_the_input_width_is_refused():
    with pytest.raises(OptionError, match=r"neuroada option k=40 exceeds the 32 inputs of target .*Use k <= 32\."):
        vpeft.apply_method(TINY_LMS["llama"](), "neuroada", k=40)
