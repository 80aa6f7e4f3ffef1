"""COCO mAP: torchmetrics is the engine; hand-computed IoU thresholds and pycocotools' COCOeval are the checks."""

from __future__ import annotations

import contextlib
import io
import json
import threading

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from vpeft.tasks.detection import DetectionTask, coco_map, gather

SIDE, SHIFTS = 20.0, (1.0, 3.0, 6.0)  # one 20 px box per class, predicted dx pixels to the right
THRESHOLDS = np.linspace(0.5, 0.95, 10)


def scene() -> list:
    """One image per class with its box; the prediction is shifted, and image 3 also holds a crowd region with a
    higher-scoring detection on it (COCOeval ignores it; counted as a false positive it would halve the precision)."""
    records = []
    for c, dx in enumerate(SHIFTS):
        box = torch.tensor([[10.0, 10.0, 10.0 + SIDE, 10.0 + SIDE]])
        label = torch.tensor([c + 1])
        truth = {"boxes": box, "labels": label, "iscrowd": torch.tensor([0]), "area": torch.tensor([400.0])}
        pred = {"boxes": box + torch.tensor([dx, 0, dx, 0]), "scores": torch.tensor([0.8]), "labels": label}
        records.append((c, pred, truth))
    crowd = torch.tensor([[40.0, 40.0, 60.0, 60.0]])
    _, pred, truth = records[2]
    truth = {
        "boxes": torch.cat([truth["boxes"], crowd]),
        "labels": torch.tensor([3, 3]),
        "iscrowd": torch.tensor([0, 1]),
        "area": torch.tensor([400.0, 400.0]),
    }
    boxes = torch.cat([pred["boxes"], crowd + 1])
    pred = {"boxes": boxes, "scores": torch.tensor([0.8, 0.9]), "labels": torch.tensor([3, 3])}
    records[2] = (2, pred, truth)
    return records


def expected_by_hand() -> dict[str, float]:
    """IoU of a side-s box with its copy moved by dx: (s - dx) / (s + dx); a class scores AP 1 at the thresholds its
    single detection passes and 0 at the others."""
    ious = [(SIDE - dx) / (SIDE + dx) for dx in SHIFTS]  # 0.905, 0.739, 0.538: none near a threshold
    passed = np.array([[iou >= t for t in THRESHOLDS] for iou in ious], dtype=float)  # (classes, thresholds)
    return {"map": 100 * passed.mean(), "map_50": 100 * passed[:, 0].mean(), "map_75": 100 * passed[:, 5].mean()}


def cocoeval(records: list) -> list[float]:
    """pycocotools' COCOeval on a json written from the same records: AP, AP50, AP75 in percent."""
    images, annotations, results = [], [], []
    for index, pred, truth in records:
        images.append({"id": index + 1, "height": 100, "width": 100, "file_name": f"{index}.png"})
        for box, label, crowd, area in zip(*truth.values(), strict=True):
            x0, y0, x1, y1 = box.tolist()
            annotations.append(
                {"id": len(annotations) + 1, "image_id": index + 1, "category_id": int(label), "iscrowd": int(crowd),
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area)}
            )  # fmt: skip
        for box, score, label in zip(*pred.values(), strict=True):
            x0, y0, x1, y1 = box.tolist()
            results.append({"image_id": index + 1, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": float(score)})  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in (1, 2, 3)]}
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(json.loads(json.dumps(results))), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [100 * s for s in evaluation.stats[:3]]


def test_perfect_predictions_score_100():
    records = [(i, {"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"]}, t)
               for i, _, t in scene()[:2]]  # fmt: skip
    result = coco_map(records)
    assert result["map"] == result["map_50"] == result["map_75"] == pytest.approx(100.0)


def test_shifted_boxes_match_the_iou_thresholds_and_cocoeval():
    result = coco_map(scene())
    hand = expected_by_hand()
    assert hand == pytest.approx({"map": 50.0, "map_50": 100.0, "map_75": 100 / 3})  # (9 + 5 + 1) / 30 thresholds
    assert {k: result[k] for k in hand} == pytest.approx(hand, abs=1e-4)
    assert [result["map"], result["map_50"], result["map_75"]] == pytest.approx(cocoeval(scene()), abs=1e-4)


def run_on_two_processes(shards: list[list]) -> list:
    """``gather`` in two threads whose ``reduce`` sums their tensors, as an all-reduce over two processes does."""
    barrier, box, out = threading.Barrier(2), [None, None], [None, None]

    def reduce_for(rank: int):
        def reduce(values: torch.Tensor) -> torch.Tensor:
            box[rank] = values
            barrier.wait()
            total = box[0] + box[1]
            barrier.wait()  # both have read before the next call overwrites
            return total

        return reduce

    def work(rank: int) -> None:
        try:
            out[rank] = gather(shards[rank], reduce_for(rank))
        except ValueError as err:  # raised in the caller's thread below
            out[rank] = err

    threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for result in out:
        if isinstance(result, ValueError):
            raise result
    return out


def test_gather_over_processes_gives_the_single_process_result():
    records = scene()
    even, odd = run_on_two_processes([records[0::2], records[1::2]])  # the engine's Subset(range(rank, N, 2))
    assert coco_map(even) == coco_map(odd) == coco_map(records)
    for (i, pred, truth), (j, pred2, truth2) in zip(records, even, strict=True):
        assert i == j and all(torch.equal(pred[k], pred2[k]) for k in pred)
        assert all(torch.equal(truth[k], truth2[k]) and truth[k].dtype == truth2[k].dtype for k in truth)


def test_gather_refuses_shards_that_do_not_cover_the_indices():
    records = scene()
    with pytest.raises(ValueError, match="exactly once"):
        run_on_two_processes([records[:2], records[:1]])


class Replay(nn.Module):
    """Returns the given detections in loader order (a stand-in model for the task's evaluation loop)."""

    def __init__(self, outputs: list[dict]):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        return [self.outputs.pop(0) for _ in images]


def test_task_evaluate_pairs_detections_with_their_images():
    records = scene()
    batches = [([torch.zeros(3, 8, 8)] * 2, [{**records[0][2], "index": 0}, {**records[1][2], "index": 1}]),
               ([torch.zeros(3, 8, 8)], [{**records[2][2], "index": 2}])]  # fmt: skip
    result = DetectionTask(None).evaluate(Replay([r[1] for r in records]), batches, torch.device("cpu"))
    assert result == coco_map(records)
