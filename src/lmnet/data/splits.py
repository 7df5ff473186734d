"""Reproducible, leak-free splits: hold-out (0.8 / 0.1 / 0.1 by default) and k-fold.

Units are patients where the dataset has them (LGG: no patient in two splits) and single images
otherwise; units are stratified by subgroup where there is one (BUSI's classes).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmnet._files import atomic_write_text
from lmnet.data.layouts import Sample

__all__ = ["make_split", "make_kfold_split", "save_split", "load_split", "check_split", "SPLITS"]

SPLITS = ("train", "val", "test")


def _units(samples: Sequence[Sample]) -> dict[str | None, list[list[str]]]:
    """Units (lists of sample names that must stay together), keyed by stratum."""
    by_unit: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_unit[s.patient if s.patient is not None else s.name].append(s)
    strata: dict[str | None, list[list[str]]] = defaultdict(list)
    for key in sorted(by_unit):
        members = by_unit[key]
        groups = sorted({m.group for m in members if m.group is not None})
        strata[groups[0] if len(groups) == 1 else None].append(sorted(m.name for m in members))
    return strata


def _allocate(n: int, ratios: Sequence[float]) -> list[int]:
    """Split ``n`` into integer parts proportional to ``ratios`` (largest remainder)."""
    raw = np.asarray(ratios, dtype=np.float64) / sum(ratios) * n
    parts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - parts), kind="stable")[: n - parts.sum()]:
        parts[i] += 1
    return parts.tolist()


def _check_ratios(ratios: Sequence[float]) -> None:
    if len(ratios) != 3 or min(ratios) < 0 or not sum(ratios) > 0 or ratios[0] <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers (train > 0), got {ratios}")


def make_split(samples: Sequence[Sample], ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
               ) -> dict[str, Any]:
    """Hold-out split ``{"train": [...], "val": [...], "test": [...]}`` of sample names.

    Deterministic for a given seed and sample list; each stratum is split in the given ratios.
    """
    _check_ratios(ratios)
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {k: [] for k in SPLITS}
    for stratum in sorted(_units(samples), key=lambda s: (s is None, s or "")):
        units = _units(samples)[stratum]
        order = rng.permutation(len(units))
        counts = _allocate(len(units), ratios)
        start = 0
        for split, count in zip(SPLITS, counts):
            for i in order[start:start + count]:
                out[split].extend(units[i])
            start += count
    return {"kind": "holdout", "seed": seed, "ratios": list(ratios),
            **{k: sorted(v) for k, v in out.items()}}


def make_kfold_split(samples: Sequence[Sample], k: int = 5, fold: int = 0, seed: int = 0,
                     val_ratio: float = 0.1) -> dict[str, Any]:
    """Fold ``fold`` of a k-fold split: test = that fold; val = ``val_ratio`` of the rest.

    Folds are stratified and patient-grouped like :func:`make_split`; across ``fold = 0 .. k-1``
    the test sets partition the dataset.
    """
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in 0..{k - 1}, got {fold}")
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    strata = _units(samples)
    for stratum in sorted(strata, key=lambda s: (s is None, s or "")):
        units = strata[stratum]
        order = rng.permutation(len(units))
        sizes = _allocate(len(units), [1.0] * k)
        bounds = np.cumsum([0] + sizes)
        test_idx = set(order[bounds[fold]:bounds[fold + 1]].tolist())
        rest = [i for i in order.tolist() if i not in test_idx]
        n_val = int(round(val_ratio * len(units))) if len(rest) > 1 else 0
        for i in test_idx:
            out["test"].extend(units[i])
        for j, i in enumerate(rest):
            out["val" if j < n_val else "train"].extend(units[i])
    return {"kind": "kfold", "k": k, "fold": fold, "seed": seed, "val_ratio": val_ratio,
            **{s: sorted(v) for s, v in out.items()}}


def save_split(split: dict[str, Any], path: str | Path) -> None:
    """Write a split as JSON."""
    atomic_write_text(path, json.dumps(split, indent=1) + "\n")


def load_split(path: str | Path, samples: Sequence[Sample] | None = None) -> dict[str, Any]:
    """Read a split JSON; with ``samples``, check that every name exists and no name repeats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no split file at {path}")
    try:
        split = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    return check_split(split, samples, str(path))


def check_split(split: Any, samples: Sequence[Sample] | None = None, source: str = "the split"
                ) -> dict[str, Any]:
    """``split`` if it has the three lists, no name twice and (with ``samples``) only known names."""
    if not isinstance(split, dict):
        raise ValueError(f"{source}: a split is a mapping of {SPLITS} to lists of names")
    missing_keys = [k for k in SPLITS if k not in split]
    if missing_keys:
        raise ValueError(f"{source}: a split needs the lists {SPLITS}; missing {missing_keys}")
    names = [n for k in SPLITS for n in split[k]]
    if len(names) != len(set(names)):
        raise ValueError(f"{source}: some images are in two splits")
    if samples is not None:
        known = {s.name for s in samples}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{source}: {len(unknown)} names are not in the dataset, e.g. {unknown[:3]}")
    return split
