"""``lmnet check-data``: counts, sizes, empty masks and problems of a dataset folder."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmnet.data.dataset import load_sample
from lmnet.data.layouts import discover

__all__ = ["check_dataset"]


def check_dataset(root: str | Path, fmt: str | None = None, read: bool = True,
                  progress: bool = True) -> dict[str, Any]:
    """Inspect a dataset; with ``read``, decode every image and mask (finds corrupt files).

    Returns a dict with ``format``, ``images``, ``groups``, ``patients``, ``empty_masks``,
    ``sizes`` (min / max height and width, distinct sizes), ``suspicious_masks`` (see
    :func:`~lmnet.data.io.mask_findings`) and ``problems`` (one line each).
    """
    fmt, samples, problems = discover(root, fmt)
    report: dict[str, Any] = {"path": str(root), "format": fmt, "images": len(samples),
                              "mask_files": sum(len(s.masks) for s in samples),
                              "images_with_several_masks": sum(len(s.masks) > 1 for s in samples),
                              "groups": dict(Counter(s.group for s in samples if s.group)),
                              "patients": len({s.patient for s in samples if s.patient}),
                              "problems": list(problems)}
    if read:
        sizes: Counter = Counter()
        empty = 0
        suspicious: list[str] = []
        for s in tqdm(samples, desc="reading", unit="img", disable=not progress):
            findings: dict = {}
            try:
                image, mask = load_sample(s, findings=findings)  # each file read once
            except (ValueError, OSError) as err:
                report["problems"].append(str(err))
                continue
            finally:
                suspicious.extend(f"{path}: {'; '.join(found)}" for path, found in findings.items())
            sizes[image.shape[:2]] += 1
            empty += not mask.any()
        report["suspicious_masks"] = suspicious
        if sizes:
            hs, ws = [h for h, _ in sizes], [w for _, w in sizes]
            report["sizes"] = {"min_height": min(hs), "max_height": max(hs), "min_width": min(ws),
                               "max_width": max(ws), "distinct": len(sizes)}
        report["empty_masks"] = empty
    return report
