"""The run-config loader: inheritance, overrides, validation messages, dump/load round trip and diffs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vpeft.engine.config import ConfigError, RunConfig, config_diff, dump_config, load_config

MINIMAL = "model: {name: vit_tiny_patch16_224}\ndata: {name: digits}\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_minimal_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "run.yaml", MINIMAL))
    assert cfg.model.name == "vit_tiny_patch16_224"
    assert cfg.method.name == "lora" and cfg.method.options == {}
    assert cfg.optim.betas == (0.9, 0.999) and cfg.train.epochs == 100


def test_base_order_and_deep_merge_two_levels(tmp_path):
    write(tmp_path, "base/root.yaml", MINIMAL + "optim: {lr: 0.1, weight_decay: 0.5}\ntrain: {epochs: 5, seed: 1}\n")
    write(tmp_path, "base/a.yaml", "_base_: root.yaml\noptim: {lr: 0.2}\ntrain: {seed: 2}\n")
    write(tmp_path, "b.yaml", "optim: {lr: 0.3}\ndata: {batch_size: 7}\n")
    child = write(tmp_path, "exp/child.yaml", "_base_: [../base/a.yaml, ../b.yaml]\ntrain: {seed: 3}\n")
    cfg = load_config(child)
    assert cfg.optim.lr == 0.3  # b comes after a
    assert cfg.optim.weight_decay == 0.5  # from root, two levels up, kept by the deep merge
    assert cfg.train.epochs == 5 and cfg.train.seed == 3  # the file itself wins
    assert cfg.data.batch_size == 7 and cfg.data.name == "digits"


def test_base_cycle_is_detected(tmp_path):
    write(tmp_path, "a.yaml", "_base_: b.yaml\n" + MINIMAL)
    write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_lists_replace(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL + "method: {name: lora, targets: [q, k, v]}\noptim: {betas: [0.8, 0.9]}\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\nmethod: {targets: [q]}\n")
    cfg = load_config(child, ["optim.betas=[0.5, 0.6]"])
    assert cfg.method.options["targets"] == ["q"]
    assert cfg.optim.betas == (0.5, 0.6)


def test_set_values_are_typed(tmp_path):
    path = write(tmp_path, "run.yaml", MINIMAL)
    cfg = load_config(
        path,
        [
            "optim.lr=5e-4",
            "train.deterministic=true",
            "method.targets=[q, v]",
            "optim.grad_clip=1",
            "optim.grad_clip=null",
            "train.device=cuda:1",
            "model.kwargs.depth=2",
            "name=my run",
        ],
    )
    assert cfg.optim.lr == pytest.approx(5e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.deterministic is True
    assert cfg.method.options == {"targets": ["q", "v"]}
    assert cfg.optim.grad_clip is None
    assert cfg.train.device == "cuda:1"
    assert cfg.model.kwargs == {"depth": 2}
    assert cfg.name == "my run"


def test_set_method_name_switches_method_and_drops_the_files_options(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL + "method: {name: lora, r: 4}\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\n")
    assert load_config(child, ["method.name=ssf"]).method.options == {}
    # options given with --set belong to the new method, whatever their order on the command line
    cfg = load_config(child, ["method.r=16", "method.name=dora"])
    assert cfg.method.name == "dora" and cfg.method.options == {"r": 16}
    assert load_config(child, ["method.r=16"]).method.options == {"r": 16}
    with pytest.raises(ConfigError, match=r"method\.r \(in --set method\.r=2\).*no option 'r'"):
        load_config(child, ["method.name=ssf", "method.r=2"])


def test_child_file_switching_method_drops_parent_options(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL + "method: {name: lora, r: 4, alpha: 4}\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\nmethod: {name: ssf}\n")
    cfg = load_config(child)
    assert cfg.method.name == "ssf" and cfg.method.options == {}
    same = write(tmp_path, "same.yaml", "_base_: base.yaml\nmethod: {name: lora, r: 2}\n")
    assert load_config(same).method.options == {"r": 2, "alpha": 4}


def test_unknown_method_option_and_name(tmp_path):
    path = write(tmp_path, "run.yaml", MINIMAL + "method: {name: lora, alpah: 4}\n")
    with pytest.raises(ConfigError, match=r"method\.alpah.*run\.yaml.*Did you mean 'alpha'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"method\.name.*--set.*'lora'"):
        load_config(write(tmp_path, "ok.yaml", MINIMAL), ["method.name=lorra"])


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, "myrun.yaml", MINIMAL + "optim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "optim.lrr" in message and "myrun.yaml" in message and "'optim.lr'" in message


def test_unknown_key_in_set(tmp_path):
    path = write(tmp_path, "run.yaml", MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["trian.epochs=3"])
    assert "trian" in str(info.value) and "'train'" in str(info.value) and "--set" in str(info.value)
    with pytest.raises(ConfigError, match=r"train\.epoch.*'train\.epochs'"):
        load_config(path, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(path, ["optim.lr.x=3"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(path, ["optim.lr"])


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("optim: {lr: abc}", "optim.lr"),
        ("optim: {lr: -1.0}", "optim.lr"),
        ("train: {epochs: 0}", "train.epochs"),
        ("train: {epochs: 2.5}", "train.epochs"),
        ("optim: {label_smoothing: 1.0}", "optim.label_smoothing"),
        ("train: {amp: fp32}", "train.amp"),
        ("data: {batch_size: '8'}", "data.batch_size"),
        ("optim: {betas: [0.9, abc]}", "optim.betas"),
    ],
)
def test_wrong_type_or_value(tmp_path, text, key):
    path = write(tmp_path, "run.yaml", MINIMAL + text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert key in str(info.value) and "run.yaml" in str(info.value)


def test_wrong_type_names_expected_and_set_source(tmp_path):
    path = write(tmp_path, "run.yaml", MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["optim.lr=abc"])
    message = str(info.value)
    assert "optim.lr" in message and "--set optim.lr=abc" in message and "float" in message and "'abc'" in message


def test_int_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "run.yaml", MINIMAL + "optim: {lr: 1, warmup_epochs: 2}\n"))
    assert cfg.optim.lr == 1.0 and cfg.optim.warmup_epochs == 2


def test_missing_required_section(tmp_path):
    with pytest.raises(ConfigError, match=r"data.*missing"):
        load_config(write(tmp_path, "run.yaml", "model: {name: x}\n"))


def test_yaml_syntax_error_reports_line(tmp_path):
    path = write(tmp_path, "bad.yaml", "model:\n  name: vit\noptim:\n  lr: [1, 2\ntrain: {}\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    message = str(info.value)
    assert "bad.yaml" in message and "line 5" in message


def test_missing_file_and_missing_base(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    child = write(tmp_path, "child.yaml", "_base_: gone.yaml\n" + MINIMAL)
    with pytest.raises(FileNotFoundError, match=r"gone\.yaml.*child\.yaml"):
        load_config(child)


def test_dump_load_round_trip(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL + "method: {name: lora, r: 4, targets: [q, v]}\n")
    path = write(tmp_path, "run.yaml", "_base_: base.yaml\nmodel: {kwargs: {depth: 2}, pretrained: ckpt.pt}\n")
    cfg = load_config(path, ["optim.lr=5e-4", "optim.betas=[0.8, 0.95]", "data.options={classes: [a, b]}"])
    out = dump_config(cfg, tmp_path / "out" / "resolved.yaml")
    text = out.read_text()
    assert "_base_" not in text and "!!python" not in text
    again = load_config(out)
    assert again == cfg and config_diff(cfg, again) == []
    assert again.method.options == {"r": 4, "targets": ["q", "v"]}


def test_config_diff(tmp_path):
    path = write(tmp_path, "run.yaml", MINIMAL + "method: {name: lora, r: 4}\n")
    a = load_config(path)
    b = load_config(path, ["optim.lr=0.5", "method.r=8", "method.alpha=2", "optim.betas=[0.9, 0.99]"])
    assert config_diff(a, b) == ["method.alpha", "method.r", "optim.betas", "optim.lr"]
    assert config_diff(a, a) == []


def test_python_construction_validates_method():
    cfg = RunConfig(model={"name": "m"}, data={"name": "d"}, method={"name": "ssf"})
    assert cfg.method.options == {}
    with pytest.raises(ValueError, match="'r'"):
        RunConfig(model={"name": "m"}, data={"name": "d"}, method={"name": "ssf", "r": 4})


def test_method_option_out_of_range_names_the_key_path_and_its_file(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL + "method: {name: lora, r: 4, alpha: 2.0, dropout: 1.5}\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\nmethod: {r: 8}\n")
    with pytest.raises(ConfigError) as info:
        load_config(child)
    # only the bad option is named, with the file it came from (the base), not the child that set r
    assert str(info.value) == (
        f"invalid run config:\n  method.dropout (in {(tmp_path / 'base.yaml').resolve()}): "
        "lora option dropout must be in [0, 1), got 1.5."
    )
    with pytest.raises(ConfigError) as info:
        load_config(child, ["method.dropout=0.1", "method.r=0"])
    assert "method.r (in --set method.r=0): lora option r must be >= 1, got 0." in str(info.value)


@pytest.mark.parametrize(
    "method, expected",
    [
        ("{name: repadapter, dim: 8, groups: 3}", "method.groups (in {path}): repadapter option groups must divide "
         "dim=8, got 3."),  # a rule across options names the option it blames
        ("{name: earth_adapter, grid: [14, 0]}", "method.grid (in {path}): earth_adapter option grid[1] must be >= 1, "
         "got 0."),  # an option inside a list is named by its key
    ],
)  # fmt: skip
def test_method_option_errors_name_the_key_and_the_file(tmp_path, method, expected):
    path = write(tmp_path, "run.yaml", MINIMAL + f"method: {method}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected.format(path=path.resolve()) in str(info.value)
