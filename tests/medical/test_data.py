"""Loading, checking, preprocessing, caching and slicing of medical data."""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import nibabel as nib
import nibabel.testing
import numpy as np
import pytest

from vpeft.data.loader import build_loader
from vpeft.medical import Preprocessing, SliceDataset, load_volumes, read_datalist
from vpeft.medical.slices import PatchDataset, augmentation
from vpeft.medical.volumes import Volume

from .conftest import blobs, write_datalist, write_nifti


def _load(root: Path, prep: Preprocessing, split: str = "training", classes: int = 3, **kw):
    return load_volumes(read_datalist(root / "dataset.json", split), prep, classes, **kw)


def test_round_trip_orientation_and_spacing(case_3d):
    root, label = case_3d
    # the file is RAS with spacing (1, 1, 2.5); reorient to LPS and resample to 2 mm in-plane, 2.5 mm through-plane
    (vol,) = _load(root, Preprocessing(orientation="LPS", spacing=(2.0, 2.0, 2.5)))
    assert vol.spacing == pytest.approx((2.0, 2.0, 2.5))
    assert nib.aff2axcodes(vol.affine) == ("L", "P", "S")
    assert vol.image.shape == (1, 8, 8, 8)
    assert vol.source_shape == (16, 16, 8) and vol.source_affine[2, 2] == 2.5
    # LPS flips x and y: voxel (0, 0, k) of the result is voxel (15ish, 15ish, k) of the file; compare by label
    expected = label[::-1, ::-1, :][::2, ::2, :]
    assert (vol.label[0] == expected).mean() > 0.9
    # intensity rule `none`: min-max to [0, 1], so image = label / 2 exactly where nearest and bilinear agree
    assert vol.image.min() == 0.0 and vol.image.max() == pytest.approx(1.0)


def test_nibabel_test_files_load(tmp_path):
    """The NIfTI files shipped with nibabel load through the same loader (3-D ones as volumes)."""
    loaded = 0
    for path in sorted(glob.glob(str(Path(nibabel.testing.data_path) / "*.nii*"))):
        img = nib.load(path)
        if img.ndim != 3 or "dconn" in path:
            continue
        write_datalist(tmp_path, {"test": [(path, None)]})
        if not np.isfinite(img.get_fdata()).all():  # resampled_anat_moved.nii: NaN outside the field of view
            with pytest.raises(ValueError, match=f"{Path(path).name}: .* voxels are NaN or infinite"):
                load_volumes(read_datalist(tmp_path / "dataset.json", "test"), Preprocessing(), 2)
            continue
        (vol,) = load_volumes(read_datalist(tmp_path / "dataset.json", "test"), Preprocessing(), 2)
        assert vol.image.shape == (1, *img.shape)
        assert vol.spacing == pytest.approx(img.header.get_zooms()[:3], rel=1e-4)
        loaded += 1
    assert loaded >= 3


def test_ct_window_and_mr_percentiles():
    ct = Preprocessing(modality="CT", window="abdomen")
    assert ct.hu_range() == (-160.0, 240.0)  # W400 L40
    out = ct.intensity()({"image": np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])})["image"]
    np.testing.assert_allclose(np.asarray(out), [[0.0, 0.0, 0.5, 1.0, 1.0]])
    mr = Preprocessing(modality="MR", percentiles=(0.0, 50.0))
    out = mr.intensity()({"image": np.arange(11.0)[None]})["image"]  # 50th percentile = 5
    np.testing.assert_allclose(np.asarray(out)[0, :6], np.arange(6) / 5)
    with pytest.raises(ValueError, match="needs data.options.window"):
        Preprocessing(modality="CT")
    with pytest.raises(ValueError, match="unknown CT window 'lungs'"):
        Preprocessing(modality="CT", window="lungs")


def test_preprocessing_saved_and_reloaded(tmp_path):
    prep = Preprocessing(modality="CT", window=(-100.0, 200.0), spacing=(1.5, 1.5, 2.0), orientation="RAS")
    prep.save(tmp_path)
    assert Preprocessing.load(tmp_path) == prep


def test_all_missing_files_listed(tmp_path):
    cases = [(f"img{i}.nii.gz", f"lab{i}.nii.gz") for i in range(3)]
    write_datalist(tmp_path, {"training": cases})
    with pytest.raises(FileNotFoundError, match="6 files do not exist") as err:
        _load(tmp_path, Preprocessing())
    for i in range(3):
        assert f"img{i}.nii.gz" in str(err.value) and f"lab{i}.nii.gz" in str(err.value)


def test_bad_cases_named(tmp_path, caplog):
    label = blobs((8, 8, 4))
    write_nifti(tmp_path / "ok.nii.gz", label.astype(np.float32))
    write_nifti(tmp_path / "ok_lab.nii.gz", label)
    write_nifti(tmp_path / "small_lab.nii.gz", label[:6])  # shape differs
    write_nifti(tmp_path / "spaced_lab.nii.gz", label, np.diag([1.0, 1.0, 3.0, 1.0]))  # spacing differs
    write_nifti(tmp_path / "values_lab.nii.gz", label * 3)  # 3 and 6 are not classes 0..2
    write_nifti(tmp_path / "four_d.nii.gz", np.zeros((8, 8, 4, 2), np.float32))
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a nifti file at all")
    write_nifti(tmp_path / "empty_lab.nii.gz", np.zeros_like(label))
    cases = [
        ("ok.nii.gz", "small_lab.nii.gz"),
        ("ok.nii.gz", "spaced_lab.nii.gz"),
        ("ok.nii.gz", "values_lab.nii.gz"),
        ("four_d.nii.gz", "ok_lab.nii.gz"),
        ("corrupt.nii.gz", "ok_lab.nii.gz"),
    ]
    write_datalist(tmp_path, {"training": cases, "empty": [("ok.nii.gz", "empty_lab.nii.gz")]})
    with pytest.raises(ValueError, match="5 problems") as err:
        _load(tmp_path, Preprocessing())
    text = str(err.value)
    assert "small_lab.nii.gz: shape (6, 8, 4) differs from image" in text
    assert "spaced_lab.nii.gz: spacing (1.0, 1.0, 3.0)" in text
    assert "values_lab.nii.gz: values [3.0, 6.0] are outside the class list 0..2" in text
    assert "four_d.nii.gz: shape (8, 8, 4, 2) is 3-D with 2 channel(s)" in text and "data.options.channels" in text
    assert "corrupt.nii.gz: cannot be read" in text
    with caplog.at_level(logging.WARNING, logger="vpeft"):
        (vol,) = _load(tmp_path, Preprocessing(), split="empty")
    assert "empty_lab.nii.gz is empty" in caplog.text and vol.label.max() == 0


def test_cache_round_trip(case_3d, tmp_path):
    root, _ = case_3d
    prep = Preprocessing(spacing=(2.0, 2.0, 2.5))
    first = _load(root, prep, cache_dir=tmp_path / "cache")[0]
    assert len(list((tmp_path / "cache").glob("*.image.npy"))) == 1
    again = _load(root, prep, cache_dir=tmp_path / "cache")[0]
    assert isinstance(again.image, np.memmap)  # read back from the cache, memory-mapped
    np.testing.assert_array_equal(again.image, first.image)
    np.testing.assert_array_equal(again.label, first.label)
    np.testing.assert_allclose(again.affine, first.affine)
    _load(root, Preprocessing(spacing=(1.0, 1.0, 2.5)), cache_dir=tmp_path / "cache")  # another spec: a new entry
    assert len(list((tmp_path / "cache").glob("*.image.npy"))) == 2


def test_slices_foreground_ratio_and_context(case_3d):
    root, label = case_3d
    (vol,) = _load(root, Preprocessing())
    holds = label.any(axis=(0, 1))  # slices along z holding a label
    everything = SliceDataset([vol], (16, 16), axis=2)
    assert len(everything) == 8
    only_fg = SliceDataset([vol], (16, 16), axis=2, foreground_ratio=1.0)
    assert [s for _, s in only_fg.index] == list(np.flatnonzero(holds))
    item = SliceDataset([vol], (16, 16), axis=2, context=1)[3]
    assert item["image"].shape == (3, 16, 16) and item["label"].shape == (16, 16)
    np.testing.assert_allclose(item["image"][1].numpy(), vol.image[0, :, :, 3])  # the centre channel
    np.testing.assert_allclose(item["image"][0].numpy(), vol.image[0, :, :, 2])  # its lower neighbour
    np.testing.assert_array_equal(item["label"].numpy(), label[:, :, 3])


def test_augmentation_keeps_image_and_mask_aligned():
    label = blobs((32, 32), seed=3)
    transform = augmentation("light", (32, 32), seed=0)  # seeded draws: the outcome does not depend on luck
    moved = 0
    for _ in range(20):
        out = transform(image=(label > 0)[..., None].astype(np.float32), mask=label.astype(np.int64))
        agree = (out["image"][..., 0] > 0.5) == (out["mask"] > 0)  # brightness and contrast stay within +-0.2
        assert agree.mean() > 0.97, "the image and the mask moved differently"
        moved += not np.array_equal(out["mask"], label)
    assert moved >= 7  # the geometry did change (the affine step runs with p = 0.7; seed 0 moves 10 of 20)


def test_loader_workers_augment_independently_and_reproducibly():
    """Eight copies of one slice, one per batch, over two workers: each worker draws its own augmentations (a forked
    copy of one generator would give both workers the same draws), and the same seed and epoch give the same batches."""
    label = blobs((32, 32), seed=3)[None, ..., None].repeat(8, axis=-1).astype(np.int16)  # (1, X, Y, 8): equal slices
    volume = Volume("same", (label > 0).astype(np.float32), label, np.eye(4), (1.0,) * 3, "-", np.eye(4), (32,) * 3)
    data = SliceDataset([volume], (32, 32), augment="light", seed=0)

    def batches(epoch: int) -> list[np.ndarray]:
        loader = build_loader(data, 1, train=True, num_workers=2, seed=0, epoch=epoch)
        return [b["label"][0].numpy() for b in loader]

    first = batches(0)
    assert len({a.tobytes() for a in first}) >= 6  # worker 0 serves items 0, 2, 4..., worker 1 items 1, 3, 5...
    for a, b in zip(first, batches(0), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, batches(1), strict=True))  # a new epoch, new draws


def test_patches_aligned(case_3d):
    root, _ = case_3d
    (vol,) = _load(root, Preprocessing())
    data = PatchDataset([vol], (8, 8, 8), samples=4, seed=0)
    assert len(data) == 4
    for i in range(4):
        item = data[i]
        assert item["image"].shape == (1, 8, 8, 8) and item["label"].shape == (8, 8, 8)
        # image = (100 label + 5) min-max scaled: exactly label / 2 voxel by voxel when crops agree
        np.testing.assert_allclose(item["image"][0].numpy(), item["label"].numpy() / 2, atol=1e-6)
