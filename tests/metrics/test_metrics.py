"""Metric definitions: hand computations and cross-checks against MONAI."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
)
from scipy import ndimage

from lmnet.metrics import (
    SegmentationEvaluator,
    aggregate_runs,
    boundary_metrics,
    class_scores,
    confusion_counts,
    lesion_scores,
)


def onehot(mask: np.ndarray) -> torch.Tensor:
    """(N, H, W) bool -> (N, 2, H, W) float one-hot, as MONAI expects."""
    m = torch.as_tensor(mask).long()
    return torch.nn.functional.one_hot(m, 2).permute(0, 3, 1, 2).float()


def random_blobs(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Smooth random blobs, some touching the image border."""
    noise = rng.random((n, h, w))
    return np.stack([ndimage.gaussian_filter(x, 2.0) > 0.52 for x in noise])


# ------------------------------------------------------------------ hand computations
def test_tiny_case_by_hand():
    true = np.array([[0, 1, 1, 0],
                     [0, 1, 1, 0],
                     [0, 0, 0, 0],
                     [0, 0, 0, 0]], bool)
    pred = np.array([[0, 0, 1, 1],
                     [0, 0, 1, 1],
                     [0, 0, 0, 0],
                     [0, 0, 0, 0]], bool)
    c = confusion_counts(pred, true)
    assert c.tolist() == [2, 2, 2, 10]  # TP, FP, FN, TN
    s = lesion_scores(c)
    assert s["dice"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))
    assert s["iou"] == pytest.approx(2 / 6)
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(0.5)
    assert s["accuracy"] == pytest.approx(12 / 16) and s["specificity"] == pytest.approx(10 / 12)
    cls = class_scores(c)
    assert cls["dice_background"] == pytest.approx(2 * 10 / (2 * 10 + 2 + 2))
    assert cls["mdice"] == pytest.approx((0.5 + 20 / 24) / 2)
    assert cls["miou"] == pytest.approx((2 / 6 + 10 / 14) / 2)
    b = boundary_metrics(pred, true)
    # Boundaries are the whole 2x2 squares; one column apart: every directed distance is 0 or 1.
    assert b["hd"] == pytest.approx(1.0) and b["assd"] == pytest.approx(0.5)


def test_one_pixel_masks():
    true = np.zeros((9, 9), bool)
    pred = np.zeros((9, 9), bool)
    true[2, 2] = True
    pred[5, 6] = True
    b = boundary_metrics(pred, true)
    assert b["hd"] == pytest.approx(5.0) and b["hd95"] == pytest.approx(5.0)
    assert b["assd"] == pytest.approx(5.0)
    assert lesion_scores(confusion_counts(pred, true))["dice"] == 0.0


def test_spacing_scales_distances():
    true = np.zeros((9, 9), bool)
    pred = np.zeros((9, 9), bool)
    true[2, 2] = True
    pred[5, 6] = True  # offset 3 rows, 4 cols
    b = boundary_metrics(pred, true, spacing=(2.0, 0.5))
    assert b["hd"] == pytest.approx(math.hypot(3 * 2.0, 4 * 0.5))


def test_empty_mask_policy():
    empty = np.zeros((30, 40), bool)
    full = np.ones((30, 40), bool)
    some = empty.copy()
    some[5:10, 5:10] = True
    assert boundary_metrics(empty, empty) == {"hd": 0.0, "hd95": 0.0, "assd": 0.0,
                                              "case": "both_empty"}
    b = boundary_metrics(empty, some)
    assert b["case"] == "pred_empty" and b["hd"] == pytest.approx(50.0)  # diagonal of 30 x 40
    b = boundary_metrics(some, empty, empty_distance=7.5)
    assert b["case"] == "true_empty" and b["hd95"] == 7.5
    b = boundary_metrics(empty, some, spacing=(0.5, 0.5))
    assert b["hd"] == pytest.approx(25.0)
    # Both empty is a perfect image for the overlap metrics; full masks too.
    assert all(v == 1.0 for v in lesion_scores(confusion_counts(empty, empty)).values())
    assert lesion_scores(confusion_counts(full, full))["specificity"] == 1.0
    assert lesion_scores(confusion_counts(empty, some))["precision"] == 0.0


# ------------------------------------------------------------------ MONAI cross-checks
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_iou_equal_monai(seed):
    rng = np.random.default_rng(seed)
    true = random_blobs(rng, 6, 40, 56)
    pred = random_blobs(rng, 6, 40, 56)
    pred[0] = False            # empty prediction
    true[1] = False            # empty truth
    pred[2] = true[2] = False  # both empty
    pred[3] = true[3] = True   # both full
    pred[4] = np.zeros_like(pred[4])
    pred[4][10, 20] = True     # one-pixel prediction
    ours = lesion_scores(confusion_counts(pred, true))
    # MONAI with ignore_empty=False scores an empty truth 1 if the prediction is empty too, else 0.
    monai_dice = compute_dice(onehot(pred), onehot(true), include_background=False,
                              ignore_empty=False)[:, 0].numpy()
    monai_iou = compute_iou(onehot(pred), onehot(true), include_background=False,
                            ignore_empty=False)[:, 0].numpy()
    np.testing.assert_allclose(ours["dice"], monai_dice, rtol=1e-6)
    np.testing.assert_allclose(ours["iou"], monai_iou, rtol=1e-6)


def test_paper_convention_equals_monai_on_the_pooled_set():
    rng = np.random.default_rng(3)
    true = random_blobs(rng, 5, 32, 32)
    pred = random_blobs(rng, 5, 32, 32)
    ev = SegmentationEvaluator()
    ev.update(pred, true)
    summary = ev.aggregate()["all"]
    # Pooling over the set = scoring the images side by side as one image.
    big_p, big_t = np.concatenate(list(pred), 1)[None], np.concatenate(list(true), 1)[None]
    monai_dice = compute_dice(onehot(big_p), onehot(big_t), include_background=True)[0].numpy()
    monai_iou = compute_iou(onehot(big_p), onehot(big_t), include_background=True)[0].numpy()
    assert summary["paper_mdice"] == pytest.approx(monai_dice.mean(), rel=1e-6)
    assert summary["paper_miou"] == pytest.approx(monai_iou.mean(), rel=1e-6)
    assert summary["fg_dice_pooled"] == pytest.approx(monai_dice[1], rel=1e-6)
    per_image = compute_dice(onehot(pred), onehot(true), include_background=False)[:, 0].numpy()
    assert summary["fg_dice_mean"] == pytest.approx(per_image.mean(), rel=1e-6)
    assert summary["fg_dice_std"] == pytest.approx(per_image.std(ddof=1), rel=1e-6)
    assert summary["paper_mdice"] > summary["fg_dice_pooled"]  # the background inflates it


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("spacing", [None, (0.7, 1.3)])
def test_boundary_metrics_equal_monai(seed, spacing):
    rng = np.random.default_rng(seed)
    true = random_blobs(rng, 4, 48, 40)
    pred = random_blobs(rng, 4, 48, 40)
    pred[3] = np.zeros_like(pred[3])
    pred[3][0, 0] = True  # one pixel in the corner
    assert true.any(axis=(1, 2)).all() and pred.any(axis=(1, 2)).all()
    ours = [boundary_metrics(p, t, spacing) for p, t in zip(pred, true)]
    sp = None if spacing is None else list(spacing)
    hd = compute_hausdorff_distance(onehot(pred), onehot(true), spacing=sp)[:, 0].numpy()
    hd95 = compute_hausdorff_distance(onehot(pred), onehot(true), percentile=95,
                                      spacing=sp)[:, 0].numpy()
    assd = compute_average_surface_distance(onehot(pred), onehot(true), symmetric=True,
                                            spacing=sp)[:, 0].numpy()
    np.testing.assert_allclose([o["hd"] for o in ours], hd, rtol=1e-5)
    np.testing.assert_allclose([o["hd95"] for o in ours], hd95, rtol=1e-5)
    np.testing.assert_allclose([o["assd"] for o in ours], assd, rtol=1e-5)


# ------------------------------------------------------------------ aggregation
def test_rad_pooled_and_per_image():
    true = np.zeros((3, 10, 10), bool)
    pred = np.zeros((3, 10, 10), bool)
    true[0, :2] = True   # 20 px
    pred[0, :3] = True   # 30 px -> +50 %
    true[1, :5] = True   # 50 px
    pred[1, :4] = True   # 40 px -> -20 %
    pred[2, :1] = True   # truth empty: excluded from the per-image mean, counted in pooled
    ev = SegmentationEvaluator()
    rows = ev.update(pred, true, names=["a", "b", "c"])
    assert [r["rad_percent"] for r in rows] == [pytest.approx(50.0), pytest.approx(-20.0), None]
    s = ev.aggregate()["all"]
    assert s["rad_pooled_percent"] == pytest.approx(100 * (80 - 70) / 70)
    assert s["rad_mean_percent"] == pytest.approx(15.0)
    assert s["rad_abs_mean_percent"] == pytest.approx(35.0)
    assert s["n_rad_images"] == 2 and s["n_true_empty"] == 1 and s["n_both_present"] == 2


def test_subgroups_are_summarized_separately():
    rng = np.random.default_rng(5)
    true, pred = random_blobs(rng, 4, 20, 20), random_blobs(rng, 4, 20, 20)
    ev = SegmentationEvaluator()
    ev.update(pred, true, names=list("abcd"), groups=["benign", "benign", "malignant", "normal"])
    result = ev.aggregate()
    assert set(result["groups"]) == {"benign", "malignant", "normal"}
    assert result["groups"]["benign"]["n_images"] == 2
    only_b = SegmentationEvaluator()
    only_b.update(pred[:2], true[:2])
    assert result["groups"]["benign"]["fg_dice_mean"] == pytest.approx(
        only_b.aggregate()["all"]["fg_dice_mean"])


def test_aggregate_runs_mean_and_std():
    runs = [{"all": {"fg_dice_mean": v, "n_images": 10, "hd_mean": None}} for v in (0.8, 0.9, 1.0)]
    agg = aggregate_runs(runs)
    assert agg["fg_dice_mean"]["mean"] == pytest.approx(0.9)
    assert agg["fg_dice_mean"]["std"] == pytest.approx(0.1)
    assert agg["fg_dice_mean"]["n"] == 3
    assert agg["hd_mean"]["mean"] is None


def test_non_binary_input_is_rejected():
    with pytest.raises(ValueError, match="only 0 and 1"):
        confusion_counts(np.full((4, 4), 2), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="differ in shape"):
        SegmentationEvaluator().update(np.zeros((4, 4)), np.zeros((4, 5)))
