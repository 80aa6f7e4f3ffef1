"""The command-line tools as users meet them: a mistake is one ``error:`` paragraph and exit status 2, never a
traceback; nothing wrong is accepted silently. Each test runs a tool's real ``main`` through
:func:`vpeft.engine.cli.run` (what ``python tools/X.py`` does), or the command itself in a subprocess with this
interpreter."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import vpeft
from tools import compare, predict_medical, show_targets
from tools import test as test_tool
from tools import train as train_tool
from vpeft.engine import cli
from vpeft.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))

TINY = {
    "model": {
        "name": "vit_tiny_patch16_224",
        "img_size": 32,
        "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    },
    "method": {"name": "lora", "r": 4},
    "data": {"name": "digits", "batch_size": 64, "num_workers": 0},
    "train": {"epochs": 1, "max_steps": 2, "tensorboard": False, "seed": 0},
}


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump({**TINY, **sections}))
    return path


def run(main, argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of a tool, as its command line would give them."""
    code = cli.run(main, [str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *named: str) -> str:
    """Status 2, no traceback, one paragraph starting with ``error:`` at the end of stderr, naming ``named``."""
    assert code == cli.USER_ERROR, err
    assert "Traceback" not in err
    paragraph = err[err.index("error: ") :].strip()
    assert "\n\n" not in paragraph and paragraph.count("error: ") == 1
    for name in named:
        assert str(name) in paragraph, (name, paragraph)
    return paragraph


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder`` with its modification time and contents."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


# -- the runner itself -------------------------------------------------------------------------------------------
def test_runner_exit_statuses(capsys):
    def mistake(argv):
        raise vpeft.errors.ConfigError("optim.lr (in --set optim.lr=-1): must be > 0")

    def interrupted(argv):
        raise KeyboardInterrupt

    def bug(argv):
        raise ZeroDivisionError("inside vpeft")

    code, err = run(mistake, [], capsys)
    assert assert_user_error(code, err, "optim.lr") == "error: optim.lr (in --set optim.lr=-1): must be > 0"
    assert run(interrupted, [], capsys) == (cli.INTERRUPTED, "")
    code, err = run(bug, [], capsys)
    assert code == cli.BUG and "Traceback" in err and "ZeroDivisionError: inside vpeft" in err
    assert err.rstrip().endswith(cli.BUG_NOTE) and "python -m vpeft env" in cli.BUG_NOTE
    assert run(lambda argv: 0, [], capsys) == (0, "")


def test_every_tool_ends_through_the_runner():
    """Every script with a ``__main__`` block (tools, benchmark, data preparation, ``python -m vpeft``) found, not
    listed: a new tool that forgets the runner fails here."""
    folders = ["tools", "V-PEFT-Bench", "V-PEFT-Bench/perf", "datasets", "datasets/medical"]
    scripts = [p for f in folders for p in sorted((ROOT / f).glob("*.py"))] + [ROOT / "vpeft" / "__main__.py"]
    scripts = [p for p in scripts if 'if __name__ == "__main__":' in p.read_text()]
    assert len(scripts) >= 17
    for script in scripts:
        assert "cli.run(main" in script.read_text(), script.relative_to(ROOT)


# -- subprocess: the real command lines ----------------------------------------------------------------------------
def test_unknown_device_stops_train_py_before_any_work(tmp_path):
    config = write_config(tmp_path / "tiny.yaml")
    cmd = [sys.executable, "tools/train.py", str(config), "--set", "train.device=gpu", "--work-dir", tmp_path / "run"]
    done = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert_user_error(done.returncode, done.stderr, "train.device", "'gpu' is not a device", "cpu", "cuda")
    assert not (tmp_path / "run").exists()


def test_compare_py_on_a_missing_path(tmp_path):
    cmd = [sys.executable, "tools/compare.py", str(tmp_path / "nothing"), str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert_user_error(done.returncode, done.stderr, str(tmp_path / "nothing"), "not run directories", "--work-dir")


def test_bench_dry_run_checks_method_options_first():
    cmd = [sys.executable, "V-PEFT-Bench/run.py", "--suite", "minivtab", "--methods", "lora:alpah=4", "--dry-run"]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert_user_error(done.returncode, done.stderr, "--methods lora:alpah=4", "method.alpah", "'alpha'")
    assert "standard/" not in done.stdout  # nothing was listed as if it would run


# -- tools/train.py ------------------------------------------------------------------------------------------------
def test_work_dir_that_is_a_file(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml")
    (tmp_path / "taken").write_text("notes")
    code, err = run(train_tool.main, [config, "--work-dir", tmp_path / "taken"], capsys)
    assert_user_error(code, err, str(tmp_path / "taken"), "is a file", "--work-dir")
    assert (tmp_path / "taken").read_text() == "notes"
    code, err = run(train_tool.main, [config, "--work-dir", tmp_path / "taken" / "run"], capsys)
    assert_user_error(code, err, str(tmp_path / "taken" / "run"), "cannot be written", "--work-dir")


def test_read_only_work_dir(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml")
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes through chmod; an immutable folder stops it (needs CAP_LINUX_IMMUTABLE)
        if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr +i: no folder is read-only to this process")
        unlock = ["chattr", "-i", str(locked)]
    else:
        locked.chmod(0o555)
        unlock = ["chmod", "755", str(locked)]
    try:
        code, err = run(train_tool.main, [config, "--work-dir", locked / "run"], capsys)
    finally:
        subprocess.run(unlock, check=True)
    assert_user_error(code, err, str(locked / "run"), "cannot be written", "--work-dir")
    assert not (locked / "run").exists()


def test_labels_beyond_num_classes_stop_before_the_first_step(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml")
    code, err = run(train_tool.main, [config, "--set", "model.num_classes=5", "--work-dir", tmp_path / "run"], capsys)
    text = assert_user_error(code, err, "train split", "labels [5, 6, 7, 8, 9] outside 0..4", "model.num_classes 5")
    assert "val split" in text and "test split" in text  # every split at once
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "config.yaml").exists()


def list_dataset(root: Path) -> Path:
    """A ``list`` dataset: 8-bit and 16-bit PNGs that are fine, and three files that are not."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    good = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        good.append(f"images/{i}.png {i % 2}")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "images" / "photo.jpg")
    photo = (root / "images" / "photo.jpg").read_bytes()
    (root / "images" / "cut.jpg").write_bytes(photo[: len(photo) * 2 // 3])
    Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)).save(root / "images" / "deep.png")
    whole = (root / "images" / "0.png").read_bytes()
    (root / "images" / "cut.png").write_bytes(whole[: len(whole) // 2])
    Image.fromarray(np.full((16, 16), np.nan, np.float32)).save(root / "images" / "float.tif")
    bad = ["images/cut.png 0", "images/float.tif 1", "images/gone.png 0", "images/cut.jpg 1"]
    (root / "train800.txt").write_text("\n".join([*good, "images/deep.png 1", "images/photo.jpg 0", *bad]) + "\n")
    (root / "val200.txt").write_text("\n".join(good[:2]) + "\n")
    (root / "test.txt").write_text("\n".join(good[2:]) + "\n")
    return root


def test_data_check_lists_every_bad_image_at_once(tmp_path, capsys):
    root = list_dataset(tmp_path / "data")
    data = {"name": "list", "root": str(root), "train_split": "train800", "val_split": "val200", "num_workers": 0}
    config = write_config(tmp_path / "tiny.yaml", data=data)
    code, err = run(train_tool.main, [config, "--work-dir", tmp_path / "run"], capsys)
    text = assert_user_error(code, err, "4 problems", "cut.png", "float.tif", "gone.png", "cut.jpg")
    assert "Truncated" in text and "pixel mode F" in text and "FileNotFoundError" in text and "truncated" in text
    assert "deep.png" not in text and "photo.jpg" not in text  # a 16-bit PNG is read, scaled by its depth
    (root / "train800.txt").write_text("\n".join(f"images/{i}.png {i % 2}" for i in range(6)) + "\nimages/deep.png 1\n")
    assert run(train_tool.main, [config, "--work-dir", tmp_path / "run2"], capsys)[0] == 0


def test_sixteen_bit_png_is_scaled_by_its_depth(tmp_path):
    from vpeft.data.common import load_rgb

    values = np.array([[0, 257, 257 * 128, 65535], [128, 129, 385, 386]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # PIL's own convert("RGB") clips this to 255
    rgb = np.asarray(load_rgb(tmp_path / "deep.png"))
    expected = np.array([[0, 1, 128, 255], [0, 1, 1, 2]], np.uint8)  # round(v / 257): 128/257 = 0.498, 129/257 = 0.502
    assert (rgb == expected[..., None]).all()


def test_pickled_code_in_pretrained_or_resume_checkpoint_is_refused(tmp_path, capsys, classification_run):
    class Exploit:
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "ran", "the pickle ran code"))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Exploit()}, f)
    config = write_config(tmp_path / "tiny.yaml")
    set_evil = ["--set", f"model.pretrained={tmp_path / 'evil.pth'}"]
    code, err = run(train_tool.main, [config, *set_evil, "--work-dir", tmp_path / "run"], capsys)
    assert_user_error(code, err, str(tmp_path / "evil.pth"), "cannot be loaded safely", "pickled")
    run_dir = shutil.copytree(classification_run, tmp_path / "resumed")
    with open(run_dir / "checkpoint.pt", "wb") as f:
        pickle.dump({"trainable": Exploit()}, f)
    more = ["--set", "train.epochs=2", "train.max_steps=null", "--force"]  # a run that is not finished yet
    code, err = run(train_tool.main, [run_dir / "config.yaml", "--resume", run_dir, *more], capsys)
    assert_user_error(code, err, str(run_dir / "checkpoint.pt"), "cannot be loaded safely")
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err
    assert not (tmp_path / "ran").exists()


# -- tools/test.py on a damaged run ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classification_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cls")
    config = write_config(tmp / "tiny.yaml")
    assert cli.run(train_tool.main, [str(config), "--work-dir", str(tmp / "run")]) == 0
    return tmp / "run"


def test_adapter_config_without_method(tmp_path, capsys, classification_run):
    run_dir = shutil.copytree(classification_run, tmp_path / "run")
    meta_path = run_dir / "adapter" / "adapter_config.json"
    meta = json.loads(meta_path.read_text())
    del meta["method"]
    meta_path.write_text(json.dumps(meta))
    code, err = run(test_tool.main, [run_dir], capsys)
    assert_user_error(code, err, str(meta_path), "['method']")


def test_truncated_adapter_weights(tmp_path, capsys, classification_run):
    run_dir = shutil.copytree(classification_run, tmp_path / "run")
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, err = run(test_tool.main, [run_dir], capsys)
    assert_user_error(code, err, str(weights), "truncated")


def test_not_a_run_directory(tmp_path, capsys):
    code, err = run(test_tool.main, [tmp_path], capsys)
    assert_user_error(code, err, str(tmp_path / "config.yaml"), "is not a run directory")


# -- tools/show_targets.py and the API -----------------------------------------------------------------------------
def test_show_targets_unknown_model_and_method(capsys):
    code, err = run(show_targets.main, ["vit_bse_patch16_224", "lora"], capsys)
    assert_user_error(code, err, "'vit_bse_patch16_224'", "'vit_base_patch16_224'")
    code, err = run(show_targets.main, ["vit_tiny_patch16_224", "lorra"], capsys)
    assert_user_error(code, err, "'lorra'", "Did you mean 'lora'")


def test_apply_method_on_a_string():
    with pytest.raises(TypeError, match=r"vpeft.apply_method takes the model \(a torch.nn.Module\) first, got str"):
        vpeft.apply_method("a string", "lora")
    with pytest.raises(UserError, match="load_adapter takes the model"):
        vpeft.load_adapter("vit_base_patch16_224", "out/adapter")


# -- medical: datalist, NaN voxels, and a run directory that is only read ------------------------------------------
MEDICAL = {
    "task": "medical_segmentation",
    "model": {**TINY["model"], "kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}},
    "method": {"name": "lora", "r": 4},
    "train": {"epochs": 1, "max_steps": 1, "seed": 0, "tensorboard": False},
}


def medical_config(path: Path, root: Path, options: dict) -> Path:
    data = {"name": "synthetic", "root": str(root), "train_split": "training", "val_split": None, "test_split": "test"}
    data.update(batch_size=8, num_workers=0, options={"spatial_dims": 2, "modality": "MR", **options})
    model = {**MEDICAL["model"], "head": {"name": "light"}}
    path.write_text(yaml.safe_dump({**MEDICAL, "model": model, "data": data}))
    return path


@pytest.fixture(scope="module")
def medical_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("medical")
    synthetic = {"spatial_dims": 2, "counts": {"training": 4, "test": 2}, "size": 32}
    config = medical_config(tmp / "med.yaml", tmp / "data", {"synthetic": synthetic})
    assert cli.run(train_tool.main, [str(config), "--work-dir", str(tmp / "run")]) == 0
    return tmp / "run"


def test_truncated_datalist_is_named(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    datalist = tmp_path / "data" / "dataset.json"
    datalist.write_text('{"labels": {"0": "background", "1": "organ"}, "training": [{"image": "a.nii.gz", "lab')
    config = medical_config(tmp_path / "med.yaml", tmp_path / "data", {})
    code, err = run(train_tool.main, [config, "--work-dir", tmp_path / "run"], capsys)
    assert_user_error(code, err, str(datalist), "not valid JSON", "truncated")


def test_predict_only_reads_the_run_directory(tmp_path, medical_run):
    image = sorted((medical_run.parent / "data" / "imagesTr").glob("*.nii.gz"))[0]
    before = snapshot(medical_run)
    subprocess.run(["chmod", "-R", "a-w", str(medical_run)], check=True)  # a shared run (root writes through it)
    try:
        (out,) = predict_medical.predict(medical_run, [str(image)], tmp_path / "pred")
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(medical_run)], check=True)
    assert snapshot(medical_run) == before  # no file added, removed, rewritten or touched
    assert nib.load(str(out)).shape == nib.load(str(image)).shape


def test_predict_on_nan_voxels_refuses_and_writes_nothing(tmp_path, capsys, medical_run):
    source = nib.load(str(sorted((medical_run.parent / "data" / "imagesTr").glob("*.nii.gz"))[0]))
    data = np.asarray(source.dataobj, dtype=np.float32).copy()
    data[: data.shape[0] // 2] = np.nan
    nan_image = tmp_path / "holes.nii.gz"
    nib.save(nib.Nifti1Image(data, source.affine), str(nan_image))
    code, err = run(predict_medical.main, [medical_run, nan_image, "--out", tmp_path / "pred"], capsys)
    assert_user_error(code, err, str(nan_image), "NaN or infinite")
    assert not (tmp_path / "pred").exists()


def test_nan_voxels_fail_the_training_data_check(tmp_path, capsys, medical_run):
    root = shutil.copytree(medical_run.parent / "data", tmp_path / "data")
    entry = json.loads((root / "dataset.json").read_text())["training"][0]
    image = root / entry["image"]
    nifti = nib.load(str(image))
    data = np.asarray(nifti.dataobj, dtype=np.float32).copy()
    data[0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, nifti.affine), str(image))
    config = medical_config(tmp_path / "med.yaml", root, {})
    code, err = run(train_tool.main, [config, "--work-dir", tmp_path / "run"], capsys)
    assert_user_error(code, err, "problems in the data", str(image), "1 of", "NaN or infinite")
    assert torch.isinf(torch.as_tensor(np.asarray(nib.load(str(image)).dataobj))).sum() == 1


def test_compare_names_every_path_that_is_not_a_run(tmp_path, capsys, classification_run):
    code, err = run(compare.main, [classification_run, tmp_path / "a", tmp_path / "b"], capsys)
    assert_user_error(code, err, "2 of the paths", str(tmp_path / "a"), str(tmp_path / "b"))
    assert cli.run(compare.main, [str(classification_run)]) == 0
    assert "lora" in capsys.readouterr().out


def test_nan_loss_is_the_users_to_fix_not_a_bug(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        vpeft, "method_loss", lambda model, context=None: torch.tensor(float("nan"))
    )  # the first loss is NaN
    config = write_config(tmp_path / "tiny.yaml")
    code, err = run(train_tool.main, [config, "--work-dir", tmp_path / "run"], capsys)
    text = assert_user_error(code, err, "loss is nan at step 0 (epoch 1)", "No epoch had finished", "optim.lr")
    assert "checkpoint" not in text and not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("argument", ["--steps=-3", "--steps=many", "--lr=-1", "--warmup=-1", "--batch=0"])
def test_pretrain_clip_refuses_a_bad_number_before_any_work(argument, tmp_path, capsys):
    from tools import pretrain_clip

    with pytest.raises(SystemExit) as done:
        pretrain_clip.main(["--out", str(tmp_path / "clip.safetensors"), argument])
    assert done.value.code == 2 and "expected" in capsys.readouterr().err
    assert not (tmp_path / "clip.safetensors").exists()
