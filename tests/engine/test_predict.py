"""tools/predict.py and vpeft.engine.run_dir: a classification run read back from its directory, never written to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vpeft
from vpeft.engine import train as engine
from vpeft.engine.config import load_config
from vpeft.engine.run_dir import open_run

from .test_train import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    (root / "tiny.yaml").write_text(TINY)
    engine.train(load_config(root / "tiny.yaml", ["train.epochs=1"]), root / "run")
    return root / "run"


def state(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_topk_names_and_probabilities_match_the_model_on_the_dataset_pipeline(run, tmp_path, capsys):
    import tools.predict as predict_tool

    cfg = load_config(run / "config.yaml")
    _, model, datasets = engine.build_run(cfg)  # the reference: the test split's own loading and transform
    vpeft.load_adapter(model, run / "adapter")
    model.eval()
    test = datasets["test"]
    files = []
    for i in range(3):
        files.append(tmp_path / f"digit{i}.png")
        test.load(i).save(files[-1])  # lossless 8-bit PNG of the dataset's own RGB image
    before = state(run)

    assert predict_tool.main([str(run), *map(str, files), "--topk", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert state(run) == before  # nothing written, nothing touched
    for i, result in enumerate(results):
        with torch.no_grad():
            probs = model(test[i][0][None]).softmax(-1)[0]
        expected = probs.topk(3)
        assert result["image"] == str(files[i])
        assert [e["index"] for e in result["top"]] == expected.indices.tolist()
        assert [e["class"] for e in result["top"]] == [str(k) for k in expected.indices.tolist()]  # digits: "0".."9"
        assert [e["probability"] for e in result["top"]] == pytest.approx(expected.values.tolist(), abs=1e-6)

    assert predict_tool.main([str(run), str(files[0])]) == 0  # text: the image, then five "p%  name" lines
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(files[0]) and len(lines) == 6
    assert [line.split()[1] for line in lines[1:4]] == [e["class"] for e in results[0]["top"]]
    assert state(run) == before


def test_class_names_come_from_the_run(run, tmp_path):
    import shutil

    import tools.predict as predict_tool

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    names = [f"digit {i}" for i in range(10)]
    (copy / "classes.json").write_text(json.dumps(names))  # training saved these; predict names by them
    image = tmp_path / "x.png"
    open_run(copy).datasets["test"].load(0).save(image)
    top = predict_tool.predict(copy, [str(image)], topk=10)[0]["top"]
    assert [e["class"] for e in top] == [names[e["index"]] for e in top]
    assert sorted(e["index"] for e in top) == list(range(10))
    assert sum(e["probability"] for e in top) == pytest.approx(1.0, abs=1e-5)


def test_wrong_inputs_are_named(run, tmp_path):
    import tools.predict as predict_tool

    with pytest.raises(FileNotFoundError, match="missing.png"):
        predict_tool.predict(run, [str(tmp_path / "missing.png")])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes.png: cannot be read as an image"):
        predict_tool.predict(run, [str(tmp_path / "notes.png")])
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        predict_tool.predict(tmp_path, [str(tmp_path / "notes.png")])
    seg = tmp_path / "seg"
    (seg / "adapter").mkdir(parents=True)
    text = (run / "config.yaml").read_text()
    assert "task: classification" in text
    (seg / "config.yaml").write_text(text.replace("task: classification", "task: segmentation"))
    with pytest.raises(ValueError, match=r"is a 'segmentation' run .*needs a 'classification' run"):
        predict_tool.predict(seg, [str(tmp_path / "notes.png")])
    with pytest.raises(SystemExit):
        predict_tool.main([str(run), str(tmp_path / "notes.png"), "--topk", "0"])
