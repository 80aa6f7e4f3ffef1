"""Option constraints are declared in the config field types (vpeft.core's shared types and Literal choices); a value
outside them is refused with one sentence naming the method, the option, the value and what is allowed. A rank
option is also held to the shape of the targets when the adapter is built."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re

import pytest
import torch
from torch import nn

import vpeft
from vpeft.core import build_config
from vpeft.errors import ConfigError, OptionError, OptionTypeError
from vpeft.methods import METHODS

from ..conftest import tiny_vit
from ..test_errors import assert_unchanged, snapshot


# one bad value per shared type (and per kind of annotation around it), with the bound written out by hand
@pytest.mark.parametrize(
    "method, option, value, allowed",
    [
        ("adapter", "dim", 0, ">= 1"),  # PositiveInt
        ("vpt_shallow", "num_prefix_tokens", -1, ">= 0"),  # NonNegativeInt
        ("lora", "dropout", 1.0, "in [0, 1)"),  # DropProbability
        ("spt_adapter", "drop_path", -0.5, "in [0, 1)"),
        ("comp_lora", "k_ratio", 0.0, "in (0, 1)"),  # ProperFraction
        ("earth_adapter", "cutoff_ratio", 1.0, "in (0, 1)"),
        ("spt_lora", "beta", -2.0, "a finite number > 0"),  # PositiveFloat
        ("spt_lora", "alpha", float("inf"), "a finite number > 0"),
        ("ssf", "init_std", -1.0, "a finite number >= 0"),  # NonNegativeFloat
        ("ssf", "init_std", float("nan"), "a finite number >= 0"),
        ("convpass", "scale", float("inf"), "a finite number"),  # FiniteFloat
        ("fact_tk", "r", 0, ">= 1"),  # Rank
        ("salt", "r_lora", 0, ">= 1"),  # LenientRank
        ("salt", "relu", "gelu", "one of 'elementwise', 'diag'"),  # Literal
        ("adapter", "act", "swish", "one of 'quick_gelu', 'gelu', 'relu', 'tanh'"),
        ("soma", "start_block", -1, ">= 0 or None"),  # a constrained type or None
        ("salt", "rank", 0, ">= 1 or None"),
    ],
)
def test_a_value_outside_the_type_names_method_option_value_and_bound(method, option, value, allowed):
    model = tiny_vit()
    with pytest.raises(OptionError) as info:
        vpeft.apply_method(model, method, **{option: value})
    assert str(info.value) == f"{method} option {option} must be {allowed}, got {value!r}."
    assert info.value.option == option
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    assert not isinstance(info.value, TypeError)  # a value error, not a type error
    assert "_vpeft" not in model.__dict__


def test_a_bad_element_inside_a_tuple_is_named_by_its_index():
    with pytest.raises(OptionError) as info:
        vpeft.apply_method(tiny_vit(), "earth_adapter", grid=[4, 0])  # YAML and JSON give lists
    assert str(info.value) == "earth_adapter option grid[1] must be >= 1, got 0."
    assert info.value.option == "grid"
    plan = [["blocks.0.attn.qkv[q]", "structured", 8, "dense", 0]]
    with pytest.raises(OptionError, match=r"spt_lora option plan\[0\]\[3\] must be one of 'none', 'structured', "):
        vpeft.apply_method(tiny_vit(), "spt_lora", plan=plan)
    with pytest.raises(OptionError, match=r"spt_lora option plan\[0\]\[2\] must be >= 0, got -1\."):
        vpeft.apply_method(tiny_vit(), "spt_lora", plan=[["blocks.0.attn.qkv[q]", "sparse", -1, "none", 0]])


def test_wrong_types_and_unknown_options_stay_type_errors():
    with pytest.raises(OptionTypeError) as info:
        vpeft.apply_method(tiny_vit(), "lora", r=2.0)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ConfigError)
    assert "option 'r' must be int, got 2.0" in str(info.value) and info.value.option == "r"
    with pytest.raises(TypeError, match=r"has no option 'drop'.*Did you mean 'dropout'") as info:
        vpeft.apply_method(tiny_vit(), "lora", drop=0.1)
    assert info.value.option == "drop"


def test_rules_across_options_stay_in_check():
    with pytest.raises(OptionError, match=r"repadapter option groups must divide dim=8, got 3\.") as info:
        vpeft.apply_method(tiny_vit(), "repadapter", dim=8, groups=3)
    assert info.value.option == "groups"
    model = tiny_vit()
    vpeft.apply_method(model, "repadapter", dim=8, groups=4)  # 4 divides 8: accepted
    assert model.blocks[0].attn.qkv.adapters["default"]["all"].up.shape == (64, 2)  # (d, h / g)
    with pytest.raises(OptionError, match="must be mergeable") as info:
        build_config(METHODS["spt_lora"].Config, {"structured": "adapter"}, "spt_lora")
    assert info.value.option == "structured"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_default_config_passes_its_own_types_and_round_trips_through_json(method):
    cls = METHODS[method].Config
    default = cls()
    saved = json.loads(json.dumps(dataclasses.asdict(default)))  # options as adapter_config.json holds them
    assert build_config(cls, saved, method) == default


# ---- rank against the shape of the targets ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, option", [("lora", "r"), ("dora", "r"), ("comp_lora", "r"), ("fact_tt", "r"), ("fact_tk", "r"),
                       ("soma", "r"), ("salt", "rank"), ("spt_lora", "r"), ("spt_adapter", "r")]
)  # fmt: skip
def test_a_rank_above_the_narrowest_target_is_refused_before_the_model_changes(method, option):
    model = tiny_vit()  # every adapted weight of the tiny ViT is 64 wide on one side at least
    before = snapshot(model)
    calibration = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))] if METHODS[method].needs_calibration else None
    with pytest.raises(OptionError) as info:
        vpeft.apply_method(model, method, calibration=calibration, **{option: 65})
    message = str(info.value)
    # soma adapts from block 1
    assert re.match(rf"{method} option {option}=65 exceeds the rank of target 'blocks\.[01]\.", message)
    assert "x 64 (out x in)" in message and f"Use {option} <= 64." in message
    assert info.value.option == option
    assert_unchanged(model, before)


def test_the_narrowest_target_sets_the_bound():
    net = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 16))  # ranks 64 and 16 at most
    before = snapshot(net)
    with pytest.raises(OptionError) as info:
        vpeft.apply_method(net, "lora", targets=["0", "1"], r=20, head=())
    assert "lora option r=20 exceeds the rank of target '1', whose weight is 16 x 128 (out x in)" in str(info.value)
    assert str(info.value).endswith("Use r <= 16.")
    assert_unchanged(net, before)
    vpeft.apply_method(net, "lora", targets=["0", "1"], r=16, head=())


def test_a_rank_equal_to_the_layer_is_accepted():
    model = tiny_vit()
    vpeft.apply_method(model, "lora", r=64, targets=["attn.qkv[q]", "mlp.fc2"])
    layer = model.blocks[1].mlp.fc2.adapters["default"]["all"]
    assert layer.lora_A.shape == (64, 256) and layer.lora_B.shape == (64, 64)


def test_a_conv_rank_is_bounded_by_out_and_in_times_kernel():
    # Conv2d(3, 8, 3): weight (8, 3, 3, 3), as a matrix 8 x 27, so rank 8 at most
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(1, 3, 6, 6))
    before = snapshot(net)
    with pytest.raises(OptionError, match=r"lora option r=9 exceeds the rank of target '0', whose weight is 8 x 27"):
        vpeft.apply_method(net, "lora", targets=["0"], r=9, head=())
    assert_unchanged(net, before)
    vpeft.apply_method(copy.deepcopy(net), "lora", targets=["0"], r=8, head=())


def test_norm_targets_and_bottleneck_adapters_have_no_rank_bound():
    # SPT's targets include norms (vectors: no rank); an adapter's bottleneck is a non-linear MLP's hidden width, so a
    # width above the layer's is an over-complete adapter, not a low-rank update
    model = tiny_vit()
    vpeft.apply_method(model, "adapter", dim=128)
    assert model.blocks[0].mlp.adapters["default"]["all"].down.weight.shape == (128, 64)


def test_a_lenient_rank_above_the_layer_warns_once(caplog):
    model = tiny_vit()
    with caplog.at_level(logging.WARNING, logger="vpeft"):
        vpeft.apply_method(model, "salt", r_lora=300)
    warnings = [r.getMessage() for r in caplog.records if "r_lora=300" in r.getMessage()]
    assert len(warnings) == 1  # one warning for the adapter, not one per target
    assert "target 'blocks.0.attn.qkv', whose weight is 192 x 64" in warnings[0]
    assert model.blocks[0].attn.qkv.adapters["default"]["all"].lora_X.shape[1] == 300  # built as asked
