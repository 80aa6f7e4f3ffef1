"""Case metrics against MONAI's own functions, slice restacking, sliding windows and saved predictions."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_hausdorff_distance

from vpeft.medical import CaseMetrics, Preprocessing, load_volumes, predict_patches, predict_slices, read_datalist
from vpeft.medical.inference import save_prediction

from .conftest import blobs

NAMES = ["bg", "a", "b"]


def _one_hot(x: torch.Tensor) -> torch.Tensor:
    return F.one_hot(x.long(), 3).movedim(-1, 0)[None].float()


def _cases(n: int = 3):
    """(prediction, label) pairs: the label's boxes shifted by one voxel, one case with class b absent."""
    out = []
    for i in range(n):
        label = torch.as_tensor(blobs((12, 12, 6), seed=i)).long()
        pred = torch.roll(label, shifts=1, dims=0)
        if i == 1:
            label[label == 2], pred[pred == 2] = 0, 0
        out.append((pred, label))
    return out


def test_dice_and_hd95_equal_monai_per_case_and_accumulated():
    spacing = (0.8, 0.8, 2.5)
    metrics = CaseMetrics(NAMES)
    dices, hds = [], []
    for pred, label in _cases():
        values = metrics.add(pred, label, spacing)
        dice = compute_dice(_one_hot(pred), _one_hot(label), include_background=False)[0]
        hd = compute_hausdorff_distance(_one_hot(pred), _one_hot(label), percentile=95, spacing=list(spacing))[0]
        torch.testing.assert_close(values[0], dice.double(), equal_nan=True)
        present = label.flatten().bincount(minlength=3)[1:] > 0
        torch.testing.assert_close(values[1][present], hd[present].double())
        dices.append(dice)
        hds.append(torch.where(present, hd, torch.nan))
    result = metrics.result()
    for c, name in enumerate(NAMES[1:]):
        expect_dice = np.nanmean([d[c].item() for d in dices])  # cases with the class only
        expect_hd = np.nanmean([h[c].item() for h in hds])
        assert result[f"dice_{name}"] == pytest.approx(expect_dice)
        assert result[f"hd95_{name}"] == pytest.approx(expect_hd)
    assert result["dice"] == pytest.approx((result["dice_a"] + result["dice_b"]) / 2)


def test_reduce_adds_processes():
    """Two halves accumulated apart and summed equal one accumulator over all cases (data-parallel reduce)."""
    cases = _cases(4)
    whole, left, right = CaseMetrics(NAMES), CaseMetrics(NAMES), CaseMetrics(NAMES)
    for i, (p, y) in enumerate(cases):
        whole.add(p, y, (1.0, 1.0, 1.0))
        (left if i % 2 else right).add(p, y, (1.0, 1.0, 1.0))
    merged = left.result(lambda s: s + right.sums)
    for key, value in whole.result().items():
        assert merged[key] == pytest.approx(value, nan_ok=True)


def test_empty_label_and_missed_class():
    metrics = CaseMetrics(NAMES)
    label = torch.zeros(8, 8, 4, dtype=torch.long)
    label[2:5, 2:5, 1:3] = 1
    metrics.add(torch.zeros_like(label), label, (1.0, 1.0, 1.0))  # class a missed, class b absent everywhere
    result = metrics.result()
    assert result["dice_a"] == 0.0 and result["hd95_missed"] == 1.0
    assert math.isnan(result["dice_b"]) and math.isnan(result["hd95_a"])
    assert result["dice"] == 0.0  # the mean skips the class no case defines


def test_restacked_slices_give_the_direct_3d_metric():
    label = torch.as_tensor(blobs((12, 12, 6), seed=5)).long()
    logits = _one_hot(label)[0] * 4.0  # (3, X, Y, Z): right everywhere...
    logits[:, :3] = _one_hot(torch.roll(label, 1, 0))[0, :, :3] * 4.0  # ...except in the first three rows

    def per_slice(images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return images[:, :3]  # the "image" carries the logits in its channels

    for axis in range(3):
        restacked = predict_slices(
            per_slice, logits, tuple(int(s) for s in np.delete(label.shape, axis)), axis=axis, batch=4
        )
        torch.testing.assert_close(restacked, logits)
        direct, stacked = CaseMetrics(NAMES), CaseMetrics(NAMES)
        direct.add(logits.argmax(0), label, (1.0, 1.5, 2.0))
        stacked.add(restacked.argmax(0), label, (1.0, 1.5, 2.0))
        assert stacked.result() == pytest.approx(direct.result(), nan_ok=True)


def test_sliding_window_shape_and_values():
    image = torch.arange(2 * 20 * 18 * 10, dtype=torch.float32).reshape(2, 20, 18, 10)
    weight = torch.tensor([[1.0, 2.0], [0.5, -1.0], [0.0, 3.0]])  # a pointwise linear "model": 2 -> 3 channels

    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kc,bc...->bk...", weight, x)

    out = predict_patches(model, image, (8, 8, 8), overlap=0.25, batch=3)
    assert out.shape == (3, 20, 18, 10)
    torch.testing.assert_close(out, model(image[None])[0], rtol=1e-5, atol=1e-3)  # overlaps average equal values


def test_saved_prediction_keeps_affine_and_grid(case_3d, tmp_path):
    root, label = case_3d
    entries = read_datalist(root / "dataset.json", "training")
    (vol,) = load_volumes(entries, Preprocessing(spacing=(2.0, 2.0, 2.5), orientation="LPS"), 3)
    out = save_prediction(torch.as_tensor(vol.label[0]), vol, tmp_path / "pred.nii.gz")
    saved = nib.load(str(out))
    source = nib.load(str(root / "img.nii.gz"))
    np.testing.assert_allclose(saved.affine, source.affine)
    assert saved.shape == source.shape
    # the label went through LPS + 2 mm and back: it lands on the original label (nearest-neighbour losses only)
    assert (np.asarray(saved.dataobj) == label).mean() > 0.85
    same = save_prediction(torch.as_tensor(label), _unchanged(vol, label), tmp_path / "same.nii")
    np.testing.assert_array_equal(np.asarray(nib.load(str(same)).dataobj), label)


def _unchanged(vol, label):
    """The volume as if no resampling had been done (its grid is the file's)."""
    from dataclasses import replace

    return replace(vol, affine=vol.source_affine, image=vol.image[:, : label.shape[0]])
