"""Plug-ins in a run: the ``plugins:`` section trains, is written to the run directory and the adapter file, is named
in the summary, reopens with the run; a wrong entry stops tools/train.py with one paragraph, exit status 2."""

from __future__ import annotations

import json

import pytest
import torch

import vpeft
from tools import train as train_tool
from vpeft.core import plugins_of
from vpeft.engine import train as engine
from vpeft.engine.config import load_config
from vpeft.engine.run_dir import open_run
from vpeft.errors import ConfigError

from ..test_cli_errors import assert_user_error, run, write_config

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGINS = [{"name": "density_loss", "weight": 0.5, "eps": 0.01}, {"name": "ggpo", "sigma": 0.01}]


def test_a_run_with_plugins_saves_names_and_reopens_them(tmp_path, monkeypatch):
    calls = {"perturb": 0, "restore": 0, "extra": []}
    real_perturb, real_restore, real_loss = vpeft.perturb, vpeft.restore, vpeft.method_loss

    def counted(name, real):
        def call(model):
            calls[name] += 1
            return real(model)

        return call

    def loss(model, context=None):
        extra = real_loss(model, context=context)
        calls["extra"].append(extra)
        return extra

    monkeypatch.setattr(vpeft, "perturb", counted("perturb", real_perturb))
    monkeypatch.setattr(vpeft, "restore", counted("restore", real_restore))
    monkeypatch.setattr(vpeft, "method_loss", loss)
    cfg = load_config(write_config(tmp_path / "tiny.yaml", plugins=PLUGINS))
    summary = engine.train(cfg, tmp_path / "run")
    assert summary["plugins"] == ["density_loss", "ggpo"]
    assert calls["perturb"] == calls["restore"] == summary["steps"] == 2
    assert all(e is not None and e.item() > 0 for e in calls["extra"])  # the density term of each micro-batch
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.plugins == PLUGINS
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert [p["name"] for p in meta["plugins"]] == ["density_loss", "ggpo"] and meta["plugins"][1]["options"][
        "sigma"
    ] == pytest.approx(0.01)
    reopened = open_run(tmp_path / "run")
    assert list(plugins_of(reopened.model)) == ["density_loss", "ggpo"]
    # the base weights after training are the pre-trained ones: no perturbation stayed behind
    fresh = open_run(tmp_path / "run").model
    vpeft.delete_adapter(fresh, "default")
    trained = dict(reopened.model.named_parameters())
    for name, p in fresh.named_parameters():
        key = name.replace(".weight", ".base_layer.weight") if name not in trained else name
        if key in trained and not trained[key].requires_grad:
            assert torch.equal(trained[key], p), name


def test_without_plugins_the_run_has_an_empty_list(tmp_path):
    cfg = load_config(write_config(tmp_path / "tiny.yaml"))
    assert cfg.plugins == []


@pytest.mark.parametrize(
    ("plugins", "words"),
    [
        ([{"name": "deft"}], ["plugins", "unknown plug-in 'deft'", "density_loss"]),
        ([{"name": "density_loss", "wieght": 1.0}], ["plugins", "wieght", "weight"]),
        ({"name": "ggpo"}, ["plugins", "list"]),
    ],
)
def test_a_wrong_plugin_entry_stops_train_py_in_one_paragraph(tmp_path, capsys, plugins, words):
    config = write_config(tmp_path / "tiny.yaml", plugins=plugins)
    with pytest.raises(ConfigError):
        load_config(config)
    code, err = run(train_tool.main, [config, "--work-dir", tmp_path / "run"], capsys)
    assert_user_error(code, err, str(config), *words)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
