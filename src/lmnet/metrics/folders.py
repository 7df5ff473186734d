"""Score a folder of predicted masks against a folder of true masks, matched by file stem.

The truth folder may also be a dataset folder as downloaded, where masks lie beside their images
and are named ``NAME_mask``, ``NAME_mask_1`` ... (BUSI, LGG): then the images there are not
masks, and the masks of one image are scored as their union, under the image's stem.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from lmnet.data.io import list_images, read_mask, warn_label_maps
from lmnet.data.layouts import mask_owner
from lmnet.metrics.evaluator import SegmentationEvaluator

__all__ = ["match_by_stem", "score_folders"]


def _by_stem(files: Sequence[Path], root: Path, what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        if f.stem in out:
            raise ValueError(f"two {what} files share the stem {f.stem!r}: {out[f.stem]} and {f}")
        out[f.stem] = f
    if not out:
        raise ValueError(f"no image files in {what} folder {root}")
    return out


def _truth_by_stem(root: Path, recursive: bool) -> dict[str, tuple[Path, ...]]:
    files = list_images(root, recursive)
    owners = {f: mask_owner(f.stem) for f in files}
    if not any(owners.values()):
        return {k: (v,) for k, v in _by_stem(files, root, "truth").items()}
    out: dict[str, list[Path]] = {}
    for f, owner in owners.items():  # NAME_mask, NAME_mask_1 -> NAME; the images are left out
        if owner:
            out.setdefault(owner, []).append(f)
    return {k: tuple(sorted(v)) for k, v in out.items()}


def match_by_stem(pred_dir: str | Path, true_dir: str | Path, recursive: bool = False
                  ) -> list[tuple[str, Path, tuple[Path, ...], str | None]]:
    """Pairs ``(stem, pred_file, true_files, group)``; the group is the truth files' sub-folder.

    ``true_files`` holds one mask, or several for an image with several (their union is its truth).
    Raises ``ValueError`` listing the stems found on one side only.
    """
    pred_root, true_root = Path(pred_dir), Path(true_dir)
    preds = _by_stem(list_images(pred_root, recursive), pred_root, "prediction")
    trues = _truth_by_stem(true_root, recursive)
    only_pred, only_true = sorted(set(preds) - set(trues)), sorted(set(trues) - set(preds))
    if only_pred or only_true:
        def show(stems: list[str]) -> str:
            return ", ".join(stems[:5]) + (f" and {len(stems) - 5} more" if len(stems) > 5 else "")
        parts = []
        if only_true:
            parts.append(f"{len(only_true)} truth masks have no prediction ({show(only_true)})")
        if only_pred:
            parts.append(f"{len(only_pred)} predictions have no truth mask ({show(only_pred)})")
        raise ValueError("files do not match by stem: " + "; ".join(parts))
    pairs = []
    for stem in sorted(trues):
        rel = trues[stem][0].parent.relative_to(true_root)
        pairs.append((stem, preds[stem], trues[stem], None if str(rel) == "." else rel.as_posix()))
    return pairs


def score_folders(pred_dir: str | Path, true_dir: str | Path,
                  spacing: tuple[float, float] | None = None,
                  empty_distance: float | str = "diagonal", recursive: bool = False,
                  progress: bool = True) -> SegmentationEvaluator:
    """Read every pair of masks, check their sizes, and score them; returns the evaluator."""
    evaluator = SegmentationEvaluator(spacing=spacing, empty_distance=empty_distance)
    pairs = match_by_stem(pred_dir, true_dir, recursive)
    pred_maps: list[Path] = []
    true_maps: list[Path] = []
    for stem, pred_path, true_paths, group in tqdm(pairs, desc="scoring", unit="img",
                                                   disable=not progress):
        pred = read_mask(pred_path, pred_maps)
        true = np.logical_or.reduce([read_mask(p, true_maps) for p in true_paths])
        true_path = true_paths[0]
        if pred.shape != true.shape:
            raise ValueError(f"{pred_path} is {pred.shape[1]}x{pred.shape[0]} but {true_path} is "
                             f"{true.shape[1]}x{true.shape[0]} (width x height): predictions must "
                             "have the size of their truth mask")
        evaluator.update(pred[None], true[None], names=[stem], groups=[group])
    warn_label_maps(pred_maps, len(pairs), "predicted masks")
    warn_label_maps(true_maps, sum(len(t) for _, _, t, _ in pairs), "truth masks")
    return evaluator
