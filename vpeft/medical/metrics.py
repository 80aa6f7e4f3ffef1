"""Per-class Dice, HD95 and normalised surface Dice of whole cases, with MONAI's metric functions, as sums.

For each case the prediction and the label (class ids on the same voxel grid) become one-hot maps and MONAI computes,
per foreground class, in physical units (the case's voxel spacing, user-needs M3 / MedSAM #109):

* Dice (``compute_dice``),
* the 95th-percentile symmetric Hausdorff distance in mm (``compute_hausdorff_distance(percentile=95)``),
* the normalised surface Dice at a tolerance in mm (``compute_surface_dice``; Nikolov et al., 2021).

Empty-label rule (documented in docs/medical.md): a class absent from a case's label is left out of that case's
Dice and NSD (MONAI's ``ignore_empty``); HD95 counts only cases where both label and prediction hold the class, and a
class the label holds but the prediction misses is counted as ``hd95_missed``. The accumulator keeps sums and counts
in one float64 tensor, so data-parallel processes add theirs (``reduce``) before the means are taken: the mean of a
class is over the cases that define it, and the headline ``dice`` is the mean of the per-class means.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from torch import Tensor

from ..errors import ConfigError

ROWS = ("dice", "dice_n", "hd95", "hd95_n", "nsd", "nsd_n", "hd95_missed")


class CaseMetrics:
    """Accumulates per-class metric sums over cases; :meth:`result` turns (reduced) sums into means."""

    def __init__(self, class_names: Sequence[str], nsd_tolerance: float = 1.0, percentile: float = 95.0):
        if len(class_names) < 2:
            raise ConfigError(f"segmentation needs background and at least one class, got {list(class_names)}.")
        self.names = list(class_names)[1:]  # foreground classes; index 0 is background
        self.tolerance, self.percentile = nsd_tolerance, percentile
        self.sums = torch.zeros(len(ROWS), len(self.names), dtype=torch.float64)

    @property
    def num_classes(self) -> int:
        return len(self.names) + 1

    def add(self, pred: Tensor, label: Tensor, spacing: Sequence[float]) -> Tensor:
        """Add one case: ``pred`` and ``label`` are (*spatial) class ids; returns this case's (3, K-1) dice/hd95/nsd."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}.")
        if len(spacing) != pred.dim():
            raise ValueError(f"spacing {tuple(spacing)} must have one value per spatial axis of {tuple(pred.shape)}.")
        p, y = self.one_hot(pred), self.one_hot(label)  # (1, K, *spatial)
        dice = compute_dice(p, y, include_background=False, ignore_empty=True)[0]
        has_label, has_pred = y[0, 1:].flatten(1).any(1), p[0, 1:].flatten(1).any(1)
        both = has_label & has_pred
        hd = torch.full_like(dice, float("nan"))
        nsd = torch.full_like(dice, float("nan"))
        spacing = [float(s) for s in spacing]
        with warnings.catch_warnings():  # MONAI warns for each empty class; the rule above handles them
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)  # MONAI 1.6 deprecations inside its own metric code
            if both.any():
                hd = compute_hausdorff_distance(p, y, percentile=self.percentile, spacing=spacing)[0].float()
                hd = torch.where(both, hd, torch.nan)
            if has_label.any():
                nsd = compute_surface_dice(p, y, [self.tolerance] * len(self.names), spacing=spacing)[0].float()
                nsd = torch.where(has_label, nsd, torch.nan)
        values = torch.stack([dice.float().cpu(), hd.cpu(), nsd.cpu()]).double()  # (3, K-1)
        ok = torch.isfinite(values)
        self.sums[0::2][:3] += torch.where(ok, values, 0.0)
        self.sums[1::2][:3] += ok.double()
        self.sums[6] += (has_label & ~has_pred).double().cpu()
        return values

    def one_hot(self, ids: Tensor) -> Tensor:
        ids = ids.long()
        if ids.min() < 0 or ids.max() >= self.num_classes:
            raise ValueError(
                f"class ids must be in 0..{self.num_classes - 1}, got {ids.min().item()}..{ids.max().item()}."
            )
        return F.one_hot(ids, self.num_classes).movedim(-1, 0)[None].float()  # (1, K, *spatial)

    def result(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        sums = reduce(self.sums.clone()) if reduce else self.sums
        out: dict[str, float] = {}
        for row, key in ((0, "dice"), (2, "hd95"), (4, "nsd")):
            means = sums[row] / sums[row + 1]  # nan where no case defines the class
            for name, value in zip(self.names, means.tolist(), strict=True):
                out[f"{key}_{name}"] = value
            defined = means[torch.isfinite(means)]
            out[key] = defined.mean().item() if len(defined) else float("nan")
        out["hd95_missed"] = sums[6].sum().item()
        return out
