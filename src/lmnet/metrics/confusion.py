"""Per-image confusion counts and the ratio metrics built on them.

Masks are binary, lesion = 1. Counts are ``[TP, FP, FN, TN]`` of the lesion class, in pixels.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_binary_masks", "confusion_counts", "ratio", "lesion_scores", "class_scores",
           "TP", "FP", "FN", "TN"]

TP, FP, FN, TN = 0, 1, 2, 3


def as_binary_masks(x: Any) -> np.ndarray:
    """A mask or a stack of masks (``(H, W)`` or ``(N, H, W)``; tensor or array) as ``bool`` numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != bool:
        values = np.unique(x)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"masks must hold only 0 and 1, found values {values[:8].tolist()}")
        x = x.astype(bool)
    return x


def confusion_counts(pred: Any, true: Any) -> np.ndarray:
    """Confusion counts of the lesion class.

    Args:
        pred, true: binary masks ``(H, W)`` or ``(N, H, W)`` of the same shape.

    Returns:
        ``int64`` array ``(..., 4)``: ``[TP, FP, FN, TN]`` per image.
    """
    p, t = as_binary_masks(pred), as_binary_masks(true)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} differ in shape")
    axes = (-2, -1)
    tp = np.sum(p & t, axis=axes)
    fp = np.sum(p & ~t, axis=axes)
    fn = np.sum(~p & t, axis=axes)
    tn = np.sum(~p & ~t, axis=axes)
    return np.stack([tp, fp, fn, tn], axis=-1).astype(np.int64)


def ratio(num: np.ndarray, den: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """``num / den``; where ``den == 0`` the result is 1 if the image has no error, else 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    perfect = np.asarray(errors) == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1), np.where(perfect, 1.0, 0.0))
    return out


def lesion_scores(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, precision, recall, specificity, Dice and IoU of the lesion class.

    Args:
        counts: ``(..., 4)`` confusion counts (per image, or summed over a set).

    Returns:
        Arrays of shape ``counts.shape[:-1]``. Zero denominators follow :func:`ratio`: an image with
        empty prediction and empty truth scores 1 on every metric.
    """
    c = np.asarray(counts, dtype=np.float64)
    tp, fp, fn, tn = c[..., TP], c[..., FP], c[..., FN], c[..., TN]
    err = fp + fn
    return {
        "accuracy": ratio(tp + tn, tp + fp + fn + tn, err),
        "precision": ratio(tp, tp + fp, err),
        "recall": ratio(tp, tp + fn, err),
        "specificity": ratio(tn, tn + fp, err),
        "dice": ratio(2 * tp, 2 * tp + fp + fn, err),
        "iou": ratio(tp, tp + fp + fn, err),
    }


def class_scores(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Dice and IoU of the lesion and of the background class, and their means over the two.

    The background's counts are the lesion's with the roles swapped: ``TP_bg = TN``,
    ``FP_bg = FN``, ``FN_bg = FP``.
    """
    c = np.asarray(counts, dtype=np.float64)
    tp, fp, fn, tn = c[..., TP], c[..., FP], c[..., FN], c[..., TN]
    err = fp + fn
    dice_fg = ratio(2 * tp, 2 * tp + fp + fn, err)
    iou_fg = ratio(tp, tp + fp + fn, err)
    dice_bg = ratio(2 * tn, 2 * tn + fn + fp, err)
    iou_bg = ratio(tn, tn + fn + fp, err)
    return {"dice_lesion": dice_fg, "dice_background": dice_bg, "mdice": (dice_fg + dice_bg) / 2,
            "iou_lesion": iou_fg, "iou_background": iou_bg, "miou": (iou_fg + iou_bg) / 2}
