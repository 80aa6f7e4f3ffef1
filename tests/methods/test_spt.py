"""SPT: the allocation rules on hand-made score tables, fused-qkv slices, sparse deltas, plan and sensitivity files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import vpeft
from vpeft.core import Target, adapter_record, select_targets
from vpeft.methods.spt import SPT, SPTAdapterConfig, SPTLoRAConfig, allocate, build_structured, decide, plan_total

from ..conftest import tiny_vit


class Batches:
    """Calibration batches that count how many were consumed (``fail=True``: consuming any is an error)."""

    def __init__(self, n: int = 2, fail: bool = False):
        g = torch.Generator().manual_seed(3)
        self.data = [
            (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)
        ]
        self.fail, self.used = fail, 0

    def __iter__(self):
        for batch in self.data:
            assert not self.fail, "calibration batches were consumed"
            self.used += 1
            yield batch


def config_of(model: nn.Module):
    return adapter_record(model, "default").config


@pytest.fixture(scope="module")
def scores_file(tmp_path_factory):
    """A sensitivity file computed once from real calibration batches on the tiny ViT."""
    path = tmp_path_factory.mktemp("spt") / "scores.safetensors"
    batches = Batches(3)
    vpeft.apply_method(tiny_vit(), "spt_lora", calibration=batches, param_budget=0.002, sensitivity_file=str(path))
    assert batches.used == 3 and path.is_file()
    return path


# the hand-made plan on the tiny ViT (width 64): which entries get a score, and what the rules must decide
Q_ROWS, V_ENTRIES, NORM_BIAS, NORM_W = 200, [3, 70, 500, 1000, 4095], 13, [5, 60]


@pytest.fixture
def planted(tmp_path):
    """Scores that are zero except: 200 in q of block 0 (>= 8*128/10 = 102.4: LoRA), 5 in v of block 0 (sparse),
    13 in blocks.1.norm1.bias (>= 64/5 = 12.8: full) and 2 in blocks.0.norm2.weight (sparse). Budget = their total."""
    model = tiny_vit()
    g = torch.Generator().manual_seed(4)
    scores = {n: torch.zeros_like(p) for n, p in model.named_parameters() if not n.startswith(("head", "patch", "pos"))}
    qkv = scores["blocks.0.attn.qkv.weight"]
    qkv.view(-1)[torch.randperm(64 * 64, generator=g)[:Q_ROWS]] = 1 + torch.rand(Q_ROWS, generator=g)  # q rows 0:64
    qkv[128:].view(-1)[V_ENTRIES] = 1 + torch.rand(len(V_ENTRIES), generator=g)
    scores["blocks.1.norm1.bias"][:NORM_BIAS] = 1 + torch.rand(NORM_BIAS, generator=g)
    scores["blocks.0.norm2.weight"][NORM_W] = 1 + torch.rand(2, generator=g)
    path = tmp_path / "planted.safetensors"
    save_file(scores, str(path))
    budget = 8 * (64 + 64) + len(V_ENTRIES) + 64 + len(NORM_W)
    return dict(sensitivity_file=str(path), param_budget=budget / 1e6)


def test_rules_on_hand_made_table():
    # M1 gets 10 selected of P_struct 100 (10 >= 100/10: structured), M2 9 (sparse); vectors of 20: 4 >= 20/5 full, 3
    scores = {
        "M1": torch.tensor([9.0] * 10 + [0.0] * 40),
        "M2": torch.tensor([0.0] * 20 + [8.0] * 9 + [0.0] * 21),
        "V1": torch.tensor([0.0] * 16 + [7.0, 7.5, 7.2, 7.1]),
        "V2": torch.tensor([6.0, 0.0, 6.5, 0.0, 6.2] + [0.0] * 15),
        "V3": torch.zeros(20),
    }
    p_struct = {"M1": 100, "M2": 100, "V1": None, "V2": None, "V3": None}
    tau, plan, idx = allocate(scores, p_struct, 100 + 9 + 20 + 3, alpha=10.0, beta=5.0)
    assert tau == 26
    assert plan == {"M1": ("structured", 100), "M2": ("sparse", 9), "V1": ("full", 20), "V2": ("sparse", 3),
                    "V3": ("none", 0)}  # fmt: skip
    assert idx["M2"].tolist() == list(range(20, 29)) and idx["V2"].tolist() == [0, 2, 4]
    # a smaller budget: the closest total drops the last entry (V2 index 0, score 6.0)
    tau, plan, idx = allocate(scores, p_struct, 131, alpha=10.0, beta=5.0)
    assert tau == 25 and plan["V2"] == ("sparse", 2) and idx["V2"].tolist() == [2, 4]


def test_vit_b16_thresholds_and_structured_counts():
    lin = lambda i, o, name: Target(name, nn.Linear(i, o), "all", "linear", 0)  # noqa: E731
    q, fc1, proj = lin(768, 768, "blocks.0.attn.q"), lin(768, 3072, "blocks.0.mlp.fc1"), lin(768, 768, "attn.proj")
    count = lambda t, c: sum(p.numel() for p in build_structured(t, c).parameters())  # noqa: E731
    lora, adapter = SPTLoRAConfig(), SPTAdapterConfig()
    assert count(q, lora) == 8 * (768 + 768) and count(fc1, lora) == 8 * (768 + 3072)
    assert count(fc1, adapter) == 2 * 8 * 3072 + 8 + 3072 and count(proj, adapter) == 2 * 8 * 768 + 8 + 768
    assert decide(1229, 768 * 768, 12_288, 10, 5) == ("structured", 12_288)  # 12,288 / 10 = 1,228.8
    assert decide(1228, 768 * 768, 12_288, 10, 5) == ("sparse", 1228)
    assert decide(3072, 768 * 3072, 30_720, 10, 5) == ("structured", 30_720)
    assert decide(3071, 768 * 3072, 30_720, 10, 5) == ("sparse", 3071)
    assert decide(5224, 768 * 3072, 52_232, 10, 5)[0] == "structured" and decide(5223, 1, 52_232, 10, 5)[0] == "sparse"
    assert decide(154, 768, None, 10, 5) == ("full", 768) and decide(153, 768, None, 10, 5) == ("sparse", 153)
    assert decide(0, 768, None, 10, 5) == ("none", 0)


@pytest.mark.parametrize("method", ["spt_lora", "spt_adapter"])
def test_plan_total_equals_trainable(method, scores_file, tmp_path):
    model = tiny_vit()
    plan_path = tmp_path / "plan.json"
    report = vpeft.apply_method(
        model, method, calibration=Batches(fail=True), sensitivity_file=str(scores_file), plan_file=str(plan_path),
        param_budget=0.004,
    )  # fmt: skip
    plan = json.loads(plan_path.read_text())
    assert report.trainable == plan["total"] == plan_total(config_of(model)) == sum(plan["counts"].values())
    assert abs(plan["total"] - 4000) < 4000 and {k for k, _ in plan["decisions"].values()} == {
        "structured",
        "sparse",
        "full",
    }


def test_qkv_slices_and_norms_follow_the_rules(planted):
    model = tiny_vit()
    report = vpeft.apply_method(model, "spt_lora", calibration=Batches(fail=True), **planted)
    assert sorted(config_of(model).plan) == sorted([
        ("blocks.0.attn.qkv[q]", "structured", 1024, "none", 0),
        ("blocks.0.attn.qkv[v]", "sparse", len(V_ENTRIES), "none", 0),
        ("blocks.1.norm1", "none", 0, "full", 64),
        ("blocks.0.norm2", "sparse", len(NORM_W), "none", 0),
    ])  # fmt: skip
    assert report.trainable == 1024 + len(V_ENTRIES) + 64 + len(NORM_W)
    assert model.blocks[0].attn.qkv.adapters["default"]["v"].weight_index.tolist() == V_ENTRIES


def test_sparse_forward_and_training_touch_only_selected_entries(planted, images):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "spt_lora", calibration=Batches(fail=True), dropout=0.0, drop_path=0.0, **planted)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # the second step moves LoRA's A as well
        opt.zero_grad()
        F.cross_entropy(model(images), torch.tensor([1, 2])).backward()
        opt.step()
    model.eval()
    # the v slice's forward is the dense linear map with the delta on exactly the selected entries
    v = model.blocks[0].attn.qkv.adapters["default"]["v"]
    dense = torch.zeros(64 * 64).index_put((torch.tensor(V_ENTRIES),), v.weight_delta.detach()).view(64, 64)
    w, b = base.blocks[0].attn.qkv.weight[128:], base.blocks[0].attn.qkv.bias[128:]
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(v.adapt_output(x, F.linear(x, w, b)), F.linear(x, w + dense, b), rtol=1e-5, atol=1e-6)
    expected = model(images)
    vpeft.merge(model)
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    diff = (model.blocks[0].attn.qkv.weight - base.blocks[0].attn.qkv.weight).detach()
    assert diff[:64].ne(0).sum() > 64 * 64 // 2  # q: low-rank update, dense
    assert not diff[64:128].any()  # k: untouched
    assert diff[128:].flatten().nonzero().flatten().tolist() == V_ENTRIES
    norm2 = (model.blocks[0].norm2.weight - base.blocks[0].norm2.weight).detach()
    assert norm2.nonzero().flatten().tolist() == NORM_W
    assert (model.blocks[1].norm1.bias != base.blocks[1].norm1.bias).all()
    assert torch.equal(model.blocks[1].norm1.weight, base.blocks[1].norm1.weight)
    assert torch.equal(model.blocks[0].attn.qkv.bias, base.blocks[0].attn.qkv.bias)


def test_plan_file_round_trip(scores_file, tmp_path):
    path = tmp_path / "plans" / "p.json"
    first = tiny_vit()
    vpeft.apply_method(first, "spt_adapter", calibration=Batches(fail=True), sensitivity_file=str(scores_file),
                       plan_file=str(path), param_budget=0.003)  # fmt: skip
    saved = json.loads(path.read_text())
    plan = copy.deepcopy(saved)
    plan["indices"] = {k: v[:1] for k, v in plan["indices"].items()}  # an edited plan: the file is what is used
    plan["decisions"] = {k: [d[0], 1 if d[0] == "sparse" else d[1]] for k, d in plan["decisions"].items()}
    path.write_text(json.dumps(plan))
    second = tiny_vit()
    report = vpeft.apply_method(second, "spt_adapter", calibration=Batches(fail=True), plan_file=str(path))
    sparse = [k for k, d in saved["decisions"].items() if d[0] == "sparse"]
    assert report.trainable == saved["total"] - sum(saved["decisions"][k][1] - 1 for k in sparse)
    for key in sparse:
        target, p = key.rsplit(".", 1)
        idx = dict(second.named_buffers())[f"{_module_path(target)}.{p}_index"]
        assert idx.tolist() == saved["indices"][key][:1]
    with pytest.raises(ValueError, match="another setting"):
        vpeft.apply_method(tiny_vit(), "spt_adapter", calibration=Batches(), plan_file=str(path), r=4)


def _module_path(key: str) -> str:
    path, _, part = key.partition("[")
    return f"{path}.adapters.default.{part.rstrip(']') or 'all'}"


def test_sensitivity_file_serves_every_budget(scores_file):
    totals = []
    for budget in (0.001, 0.004):
        model = tiny_vit()
        report = vpeft.apply_method(model, "spt_lora", calibration=Batches(fail=True),
                                    sensitivity_file=str(scores_file), param_budget=budget)  # fmt: skip
        totals.append(report.trainable)
        assert report.trainable == plan_total(config_of(model))
    assert totals[0] < totals[1]


def test_save_load_rebuilds_without_calibration(scores_file, images, tmp_path):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "spt_lora", calibration=Batches(fail=True), sensitivity_file=str(scores_file),
                       param_budget=0.002)  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    vpeft.save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(base)
    vpeft.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(images), model(images), rtol=0, atol=0)
    assert {n: b for n, b in fresh.named_buffers() if "index" in n}.keys() == {
        n for n, _ in model.named_buffers() if "index" in n
    }


def test_prepare_leaves_the_model_alone():
    model = tiny_vit()
    model.blocks[0].requires_grad_(False)
    model.blocks[1].train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = SPTLoRAConfig(param_budget=0.002)
    prepared = SPT.prepare(config, model, select_targets(model, config, SPT, "spt_lora"), Batches())
    decided = prepared.config  # the sparse indices travel beside it, per target (core.Prepared)
    sparse = {(e[0], p) for e in decided.plan for p, kind in (("weight", e[1]), ("bias", e[3])) if kind == "sparse"}
    assert {(key, p) for key, tensors in prepared.per_target.items() for p in tensors} == sparse
    assert decided.plan and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_structured_options(scores_file, images):
    model = tiny_vit()
    vpeft.apply_method(model, "spt_lora", calibration=Batches(fail=True), sensitivity_file=str(scores_file),
                       param_budget=0.004, structured="dora")  # fmt: skip
    kinds = {type(m.structured).__name__ for m in model.modules() if isinstance(m, SPT) and m.structured is not None}
    assert kinds == {"DoRA"} and vpeft.report(model).trainable == plan_total(config_of(model))
    expected = model(images)
    vpeft.merge(model)
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must be mergeable"):
        vpeft.apply_method(tiny_vit(), "spt_lora", calibration=Batches(), structured="adapter")
    with pytest.raises(ValueError, match="wraps Linear"):
        vpeft.apply_method(tiny_vit(), "spt_adapter", calibration=Batches(), structured="fact_tt")
    with pytest.raises(ValueError, match="needs calibration"):
        vpeft.apply_method(tiny_vit(), "spt_lora")


def test_a_loss_callable_scores_as_its_batch_does():
    """Calibration items may be callables returning a loss (how the engine passes a task's own loss): one computing
    cross-entropy gives exactly the scores of the ``(inputs, labels)`` pair it closes over."""
    from vpeft.methods.spt import _candidates, sensitivity

    model = tiny_vit()
    config = SPTLoRAConfig(param_budget=0.002)
    targets = select_targets(model, config, SPT, "spt_lora")
    params = {pn: getattr(t.module, pn.rsplit(".", 1)[1]) for t in targets for pn, _ in _candidates(t).values()}
    pairs = Batches(2).data

    def loss_of(inputs, labels):
        return lambda m: torch.nn.functional.cross_entropy(m(inputs), labels)

    torch.manual_seed(0)  # the same drop-path draws in both passes
    by_pairs = sensitivity(model, params, pairs, 2, "grad2")
    torch.manual_seed(0)
    by_losses = sensitivity(model, params, [loss_of(x, y) for x, y in pairs], 2, "grad2")
    assert by_pairs.keys() == by_losses.keys() and len(by_pairs) > 0
    for name, score in by_pairs.items():
        assert torch.equal(score, by_losses[name]), name
    assert sum(float(s.sum()) for s in by_pairs.values()) > 0


def test_scores_are_squared_gradients_summed_over_batches():
    """Against ``torch.autograd.grad`` per batch, with the same drop-path draws; a caller's gradients survive."""
    from vpeft.methods.spt import _candidates, sensitivity

    model = tiny_vit()
    targets = select_targets(model, SPTLoRAConfig(), SPT, "spt_lora")
    params = {pn: getattr(t.module, pn.rsplit(".", 1)[1]) for t in targets for pn, _ in _candidates(t).values()}
    pairs = Batches(2).data
    marker = torch.full_like(model.head.weight, 7.0)
    model.head.weight.grad = marker
    torch.manual_seed(0)
    scores = sensitivity(model, params, pairs, 2, "grad2")
    assert model.head.weight.grad is marker and all(p.grad is None for p in params.values())

    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    model.train()
    torch.manual_seed(0)
    for inputs, labels in pairs:
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            expected[n] += g.square()
    for n in params:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-5, atol=1e-12)


def test_kth_largest_without_a_global_sort_equals_sorting():
    from vpeft.methods.spt import _Ranking

    g = torch.Generator().manual_seed(5)
    scores = {
        "a": torch.rand(7, 5, generator=g).square(),
        "b": torch.tensor([0.0, 0.0, 0.25, 0.25, 0.25, 1e-30, 3e5]),  # zeros, ties, a subnormal-scale and a large value
        "c": torch.randint(0, 4, (40,), generator=g).float() / 4,
    }
    ranking = _Ranking(scores)
    flat = torch.sort(torch.cat([s.flatten() for s in scores.values()]), descending=True).values
    for k in range(1, flat.numel() + 1):
        assert ranking.kth_largest(k) == flat[k - 1], k


def qkv_structured(tmp_path, **options) -> nn.Module:
    """The tiny ViT with a hand-written plan: LoRA on q, k and v of block 0's fused qkv, trainable tensors random."""
    width, r = 64, 8
    keys = [f"blocks.0.attn.qkv[{p}].weight" for p in "qkv"]
    plan = {"format": "vpeft.spt_plan", "structured": "lora", "r": r, "indices": {},
            "decisions": {k: ["structured", r * (width + width)] for k in keys}}  # fmt: skip
    path = tmp_path / "qkv_plan.json"
    path.write_text(json.dumps(plan))
    model = tiny_vit()
    vpeft.apply_method(model, "spt_lora", calibration=Batches(fail=True), plan_file=str(path), drop_path=0.0, **options)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("head"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def by_hand(qkv: nn.Module, x: torch.Tensor, lora_input: torch.Tensor) -> torch.Tensor:
    """The base output plus each slice's B A (alpha = r: no scaling) of ``lora_input`` on its own columns."""
    out = qkv.base_layer(x).detach().clone()
    for i, part in enumerate("qkv"):
        lora = qkv.adapters["default"][part].structured
        out[..., 64 * i : 64 * (i + 1)] += lora_input @ lora.lora_A.detach().T @ lora.lora_B.detach().T
    return out


def test_qkv_slices_share_one_dropout_mask(tmp_path):
    from vpeft.methods._blocks import Dropout

    model = qkv_structured(tmp_path, dropout=0.5).train()
    qkv, x = model.blocks[0].attn.qkv, torch.randn(2, 5, 64)
    torch.manual_seed(7)
    out = qkv(x)
    torch.manual_seed(7)
    dropped = Dropout(0.5).train()(x)  # one draw, the same RNG stream: the mask q, k and v must all see
    torch.testing.assert_close(out, by_hand(qkv, x, dropped), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout, train", [(0.5, False), (0.0, True)])
def test_qkv_slices_without_dropout_are_unchanged(tmp_path, dropout, train):
    model = qkv_structured(tmp_path, dropout=dropout).train(train)
    qkv, x = model.blocks[0].attn.qkv, torch.randn(2, 5, 64)
    torch.testing.assert_close(qkv(x), by_hand(qkv, x, x), rtol=1e-5, atol=1e-5)
