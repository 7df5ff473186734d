"""Boundary metrics: Hausdorff distance, its 95th percentile (HD95) and the average symmetric
surface distance (ASSD) between predicted and true lesion boundaries.

Boundary pixels are those of the mask that a 4-connected binary erosion removes (``mask XOR
erode(mask)``, pixels at the image edge included), as MONAI's ``get_mask_edges`` defines them.
Distances are exact Euclidean distances from each boundary pixel to the nearest boundary pixel of
the other mask, from SciPy's distance transform, in pixels or, with ``spacing``, in physical units.

Empty masks (the policy, never a silently dropped image):
    * both masks empty: every distance is 0;
    * exactly one mask empty: every distance is ``empty_distance``, by default the image diagonal
      ``sqrt((H * sy)^2 + (W * sx)^2)``, the largest distance possible on the image.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["mask_boundary", "surface_distances", "boundary_metrics", "boundary_case", "BOUNDARY_CASES"]

#: Names of the four cases counted in every report.
BOUNDARY_CASES = ("both_present", "both_empty", "pred_empty", "true_empty")


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask ``(H, W)``: the mask minus its 4-connected erosion."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances between the boundaries of two non-empty boolean masks ``(H, W)``.

    Returns:
        ``(d_pred_to_true, d_true_to_pred)``: one distance per boundary pixel of each mask.
    """
    # Work on the bounding box of the union with a margin of one pixel: same distances, less area.
    union = pred | true
    rows, cols = np.flatnonzero(union.any(1)), np.flatnonzero(union.any(0))
    r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, union.shape[0])
    c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, union.shape[1])
    # The boundary is taken on the full image so that the image edge counts as in MONAI.
    bp, bt = mask_boundary(pred)[r0:r1, c0:c1], mask_boundary(true)[r0:r1, c0:c1]
    sampling = None if spacing is None else tuple(float(s) for s in spacing)
    to_true = ndimage.distance_transform_edt(~bt, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~bp, sampling=sampling)
    return to_true[bp], to_pred[bt]


def boundary_case(pred: np.ndarray, true: np.ndarray) -> str:
    """Which of :data:`BOUNDARY_CASES` a pair of masks falls in."""
    p_any, t_any = bool(pred.any()), bool(true.any())
    if p_any and t_any:
        return "both_present"
    if not (p_any or t_any):
        return "both_empty"
    return "true_empty" if p_any else "pred_empty"


def boundary_metrics(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float] | None = None,
                     empty_distance: float | str = "diagonal") -> dict[str, float | str]:
    """HD, HD95 and ASSD of one image.

    Args:
        pred, true: boolean masks ``(H, W)``.
        spacing: pixel size ``(sy, sx)`` in physical units; ``None`` gives pixels.
        empty_distance: distance used when exactly one mask is empty: ``"diagonal"`` or a number
            (in the same unit as the result).

    Returns:
        ``{"hd", "hd95", "assd", "case"}`` where case is one of :data:`BOUNDARY_CASES`.
        HD95 is ``max(P95(d_pred_to_true), P95(d_true_to_pred))`` with linear interpolation
        between ranks, as in MONAI; ASSD is the mean of both directed distance sets together.
    """
    case = boundary_case(pred, true)
    if case == "both_present":
        d_pt, d_tp = surface_distances(pred, true, spacing)
        both = np.concatenate([d_pt, d_tp])
        return {"hd": float(max(d_pt.max(), d_tp.max())),
                "hd95": float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))),
                "assd": float(both.mean()), "case": "both_present"}
    if case == "both_empty":
        return {"hd": 0.0, "hd95": 0.0, "assd": 0.0, "case": case}
    if empty_distance == "diagonal":
        sy, sx = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
        dist = float(np.hypot(pred.shape[0] * sy, pred.shape[1] * sx))
    else:
        dist = float(empty_distance)
    return {"hd": dist, "hd95": dist, "assd": dist, "case": case}
