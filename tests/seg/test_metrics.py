"""Segmentation loss, metrics and sliding-window inference, against torchmetrics and hand-computed values."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

from vpeft.data.segmentation import IGNORE_INDEX, collate_pairs
from vpeft.tasks.segmentation import SegmentationTask, confusion_matrix, scores, slide_inference


def _task(**head) -> SegmentationTask:
    return SegmentationTask(SimpleNamespace(model=SimpleNamespace(head=head)))


def _labels(generator: torch.Generator, shape, classes: int) -> torch.Tensor:
    labels = torch.randint(0, classes, shape, generator=generator)
    return labels.masked_fill(torch.rand(shape, generator=generator) < 0.1, IGNORE_INDEX)


def test_scores_equal_torchmetrics():
    g = torch.Generator().manual_seed(0)
    target = _labels(g, (3, 20, 20), 5)
    pred = torch.where(torch.rand(3, 20, 20, generator=g) < 0.6, target.clamp(max=4), torch.randint(0, 5, (3, 20, 20)))
    ours = scores(confusion_matrix(pred, target, 5))
    kw = {"num_classes": 5, "ignore_index": IGNORE_INDEX}
    assert ours["mIoU"] == pytest.approx(100 * MulticlassJaccardIndex(average="macro", **kw)(pred, target).item())
    assert ours["mDice"] == pytest.approx(100 * MulticlassF1Score(average="macro", **kw)(pred, target).item())
    assert ours["aAcc"] == pytest.approx(100 * MulticlassAccuracy(average="micro", **kw)(pred, target).item())


def test_classes_never_seen_nor_predicted_are_left_out():
    target = torch.tensor([0, 0, 0, 1, IGNORE_INDEX])
    pred = torch.tensor([0, 0, 1, 1, 2])  # the ignored pixel's prediction does not count
    confusion = confusion_matrix(pred, target, 3)
    assert confusion.tolist() == [[2, 1, 0], [0, 1, 0], [0, 0, 0]]
    result = scores(confusion)
    assert result["mIoU"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)  # class 2 absent: not a zero in the mean
    assert result["mDice"] == pytest.approx(100 * (4 / 5 + 2 / 3) / 2)
    assert result["aAcc"] == pytest.approx(75.0)


def test_confusion_matrix_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), 3)


class Pointwise(nn.Module):
    """A 1x1 conv: translation-equivariant with no context, so windows cannot change a pixel's logits."""

    def __init__(self, classes: int = 4, size: tuple[int, int] | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.size, self.num_classes = nn.Conv2d(3, classes, 1), size, classes

    def forward(self, x):
        if self.size is not None:
            assert tuple(x.shape[-2:]) == self.size  # a fixed-size backbone sees whole windows only
        return self.conv(x)


def test_sliding_window_equals_a_whole_image_forward_for_a_pointwise_model():
    model, image = Pointwise(size=(8, 8)), torch.randn(2, 3, 20, 27)
    torch.testing.assert_close(slide_inference(model, image, crop=8, stride=5), model.conv(image))
    small = torch.randn(1, 3, 5, 6)  # smaller than the window: padded, then cropped back
    torch.testing.assert_close(slide_inference(model, small, crop=8, stride=5), model.conv(small))


def test_sliding_window_averages_overlapping_windows():
    """10x10 image, 6-pixel windows every 4: windows at rows/cols {0, 4}; window k's logits are all k."""

    class Counter(nn.Module):
        calls = 0

        def forward(self, x):
            self.calls += 1
            return torch.full((x.shape[0], 1, *x.shape[-2:]), float(self.calls - 1))

    out = slide_inference(Counter(), torch.zeros(1, 3, 10, 10), crop=6, stride=4)[0, 0]
    assert out[0, 0] == 0 and out[0, 9] == 1 and out[9, 0] == 2 and out[9, 9] == 3  # covered by one window
    assert out[5, 5] == pytest.approx(1.5)  # all four
    assert out[0, 5] == pytest.approx(0.5) and out[5, 0] == pytest.approx(1.0)  # two each


def test_evaluate_matches_torchmetrics_and_sums_over_processes():
    g = torch.Generator().manual_seed(1)
    model = Pointwise(classes=3).eval()
    model.num_classes = 3
    items = [(torch.randn(3, 8, 8, generator=g), _labels(g, (8, 8), 3)) for _ in range(5)]
    items.append((torch.randn(3, 6, 10, generator=g), _labels(g, (6, 10), 3)))  # another size: a list batch
    loader = [collate_pairs(items[:3]), collate_pairs(items[3:4]), collate_pairs(items[4:])]
    assert isinstance(loader[-1][0], list) and loader[0][0].shape == (3, 3, 8, 8)
    task = _task()
    single = task.evaluate(model, loader, torch.device("cpu"))
    doubled = task.evaluate(model, loader, torch.device("cpu"), reduce=lambda t: 2 * t)  # two equal processes
    assert doubled == pytest.approx(single)
    with torch.no_grad():
        preds = torch.cat([model(x[None]).argmax(1).flatten() for x, _ in items])
        logits = [model(x[None]) for x, _ in items]
    targets = torch.cat([y.flatten() for _, y in items])
    jaccard = MulticlassJaccardIndex(3, average="macro", ignore_index=IGNORE_INDEX)(preds, targets)
    assert single["mIoU"] == pytest.approx(100 * jaccard.item())
    flat_logits = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, 3) for z in logits])
    assert single["loss"] == pytest.approx(F.cross_entropy(flat_logits, targets, ignore_index=IGNORE_INDEX).item())


def test_evaluate_uses_the_sliding_window_when_configured():
    model = Pointwise(classes=2, size=(4, 4)).eval()
    model.num_classes = 2
    batch = (torch.randn(1, 3, 9, 9), torch.zeros(1, 9, 9, dtype=torch.long))
    with pytest.raises(AssertionError):
        _task().evaluate(model, [batch], torch.device("cpu"))  # a whole 9x9 image reaches the 4x4 model
    result = _task(slide={"crop": 4, "stride": 3}).evaluate(model, [batch], torch.device("cpu"))
    expected = (model.conv(batch[0]).argmax(1) == 0).double().mean().item()
    assert result["aAcc"] == pytest.approx(100 * expected)


def test_loss_ignores_255_and_adds_dice_when_asked():
    g = torch.Generator().manual_seed(2)
    images, masks = torch.randn(2, 3, 6, 6, generator=g), _labels(g, (2, 6, 6), 4)
    model = Pointwise(classes=4)
    logits = model(images)
    valid = masks != IGNORE_INDEX
    ce = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], masks[valid])
    torch.testing.assert_close(_task().loss(model, (images, masks)), ce)
    # Dice by hand (MONAI's smoothing 1e-5): per image and class over the labelled pixels, then the mean
    probs = logits.softmax(1) * valid[:, None]
    onehot = F.one_hot(masks.masked_fill(~valid, 0), 4).permute(0, 3, 1, 2) * valid[:, None]
    inter, total = (probs * onehot).sum((2, 3)), (probs + onehot).sum((2, 3))
    dice = (1 - (2 * inter + 1e-5) / (total + 1e-5)).mean()
    torch.testing.assert_close(_task(dice_weight=0.5).loss(model, (images, masks)), ce + 0.5 * dice)


def test_an_all_ignored_batch_gives_a_zero_loss_with_a_graph():
    model = Pointwise()
    loss = _task().loss(model, (torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), IGNORE_INDEX)))
    loss.backward()
    assert loss.item() == 0 and model.conv.weight.grad is not None


def test_bad_slide_options_are_named():
    with pytest.raises(ValueError, match=r"slide takes \{crop, stride\}"):
        _task(slide={"size": 4})
    with pytest.raises(ValueError, match="slide.stride must be a positive integer"):
        _task(slide={"crop": 4, "stride": 0})
    assert _task(slide={"crop": 512}).slide == {"crop": (512, 512), "stride": (341, 341)}
