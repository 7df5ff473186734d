"""Accumulate per-image scores over an evaluation set and aggregate them in both conventions.

Conventions (see ``docs/metrics.md``):
    * ``paper_*``: Dice / IoU averaged over the classes {background, lesion}, from confusion counts
      pooled over the whole set (how the LM-Net authors compute "mDice" / "mIoU");
    * ``fg_*``: Dice / IoU of the lesion class, per image then averaged over images (``_mean``,
      ``_std``), and from pooled counts (``_pooled``), as PraNet / FCBFormer-style papers report;
    * accuracy, precision, recall, specificity: of the lesion class, pooled and per image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from lmnet.metrics.boundary import BOUNDARY_CASES, boundary_case, boundary_metrics
from lmnet.metrics.confusion import (
    FN,
    FP,
    TN,
    TP,
    as_binary_masks,
    class_scores,
    confusion_counts,
    lesion_scores,
)

__all__ = ["SegmentationEvaluator", "summarize", "mean_std"]

_PER_IMAGE = ("accuracy", "precision", "recall", "specificity", "dice", "iou")


def mean_std(values: Iterable[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof = 1); ``None`` where undefined."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-image rows (as produced by :class:`SegmentationEvaluator`) into one dict."""
    if not rows:
        raise ValueError("no images to summarize")
    counts = np.array([[r["tp"], r["fp"], r["fn"], r["tn"]] for r in rows], dtype=np.int64)
    pooled = counts.sum(0)
    out: dict[str, Any] = {"n_images": len(rows)}
    lesion = lesion_scores(pooled)
    classes = class_scores(pooled)
    out["paper_mdice"] = float(classes["mdice"])
    out["paper_miou"] = float(classes["miou"])
    out["paper_dice_background"] = float(classes["dice_background"])
    out["paper_iou_background"] = float(classes["iou_background"])
    for name in _PER_IMAGE:
        prefix = "fg_" if name in ("dice", "iou") else ""
        mean, std = mean_std(r[name] for r in rows)
        out[f"{prefix}{name}_mean"], out[f"{prefix}{name}_std"] = mean, std
        out[f"{prefix}{name}_pooled"] = float(lesion[name])
    for name in ("hd", "hd95", "assd"):
        out[f"{name}_mean"], out[f"{name}_std"] = mean_std(r[name] for r in rows)
    for case in BOUNDARY_CASES:
        out[f"n_{case}"] = sum(r["boundary_case"] == case for r in rows)
    true_area = int(counts[:, TP].sum() + counts[:, FN].sum())
    pred_area = int(counts[:, TP].sum() + counts[:, FP].sum())
    out["rad_pooled_percent"] = (100.0 * (pred_area - true_area) / true_area) if true_area else None
    rads = [r["rad_percent"] for r in rows if r["rad_percent"] is not None]
    out["rad_mean_percent"], out["rad_std_percent"] = mean_std(rads)
    out["rad_abs_mean_percent"] = mean_std(abs(x) for x in rads)[0]
    out["n_rad_images"] = len(rads)
    return out


@dataclass
class SegmentationEvaluator:
    """Accumulating evaluator (``update`` / ``aggregate`` / ``reset``, after MONAI's metrics).

    Args:
        spacing: pixel size ``(sy, sx)`` for the boundary metrics; ``None`` gives pixels.
        empty_distance: boundary distance when exactly one mask is empty, ``"diagonal"`` or a number.
        boundary: compute HD / HD95 / ASSD (``False`` leaves them ``None``: faster, for validation).
    """

    spacing: tuple[float, float] | None = None
    empty_distance: float | str = "diagonal"
    boundary: bool = True
    rows: list[dict[str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        self.rows.clear()

    def update(self, pred: Any, true: Any, names: Sequence[str] | None = None,
               groups: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
        """Score a batch of binary masks ``(N, H, W)`` (or one ``(H, W)``); returns its rows."""
        p, t = as_binary_masks(pred), as_binary_masks(true)
        if p.shape != t.shape:
            raise ValueError(f"prediction {p.shape} and truth {t.shape} differ in shape")
        if p.ndim == 2:
            p, t = p[None], t[None]
        n = p.shape[0]
        names = list(names) if names is not None else [f"image_{len(self.rows) + i}" for i in range(n)]
        groups = list(groups) if groups is not None else [None] * n
        if len(names) != n or len(groups) != n:
            raise ValueError(f"{n} masks but {len(names)} names and {len(groups)} groups")
        counts = confusion_counts(p, t)
        scores = lesion_scores(counts)
        new = []
        for i in range(n):
            c = counts[i]
            true_area, pred_area = int(c[TP] + c[FN]), int(c[TP] + c[FP])
            row: dict[str, Any] = {"name": names[i], "group": groups[i],
                                   "height": int(p.shape[1]), "width": int(p.shape[2]),
                                   "tp": int(c[TP]), "fp": int(c[FP]), "fn": int(c[FN]),
                                   "tn": int(c[TN]), "true_area": true_area, "pred_area": pred_area}
            row.update({k: float(v[i]) for k, v in scores.items()})
            if self.boundary:
                b = boundary_metrics(p[i], t[i], self.spacing, self.empty_distance)
                row.update(hd=b["hd"], hd95=b["hd95"], assd=b["assd"], boundary_case=b["case"])
            else:
                row.update(hd=None, hd95=None, assd=None, boundary_case=boundary_case(p[i], t[i]))
            row["rad_percent"] = (100.0 * (pred_area - true_area) / true_area) if true_area else None
            new.append(row)
        self.rows.extend(new)
        return new

    def aggregate(self) -> dict[str, Any]:
        """``{"all": {...}, "groups": {name: {...}}, "settings": {...}}``; see :func:`summarize`."""
        result: dict[str, Any] = {"all": summarize(self.rows), "groups": {}}
        names = sorted({r["group"] for r in self.rows if r["group"] is not None})
        for g in names:
            result["groups"][g] = summarize([r for r in self.rows if r["group"] == g])
        result["settings"] = {
            "distance_unit": "pixel" if self.spacing is None else "physical (spacing units)",
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "empty_distance": self.empty_distance,
            "std": "sample standard deviation over images (ddof=1)",
        }
        return result
