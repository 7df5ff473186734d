"""Dataset layouts, exactly as their users download them, turned into a list of samples.

| format  | layout |
|---------|--------|
| kvasir  | ``images/*.jpg`` + ``masks/*.jpg`` (JPEG masks, thresholded) |
| busi    | ``benign/``, ``malignant/``, ``normal/`` with ``NAME.png``, ``NAME_mask.png``, ``NAME_mask_1.png`` ... |
| lgg     | ``kaggle_3m/<patient>/<patient>_<n>.tif`` + ``<patient>_<n>_mask.tif`` |
| cvc     | ``Original/*.tif`` + ``Ground Truth/*.tif`` (CVC-ClinicDB) |
| generic | ``images/`` + ``masks/`` with matching file stems, any common format |
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lmnet.data.io import list_images

__all__ = ["Sample", "FORMATS", "MASK_STEM", "mask_owner", "detect_format", "discover", "DatasetError"]

FORMATS = ("kvasir", "busi", "lgg", "cvc", "generic")
BUSI_CLASSES = ("benign", "malignant", "normal")
#: The end of a mask file's stem beside its image: BUSI ``NAME_mask``, ``NAME_mask_1``; LGG ``NAME_mask``.
MASK_STEM = re.compile(r"_mask(?:_\d+)?$")


def mask_owner(stem: str) -> str | None:
    """``NAME`` for the stem of a mask file beside its image (``NAME_mask``, ``NAME_mask_1``), else None."""
    m = MASK_STEM.search(stem)
    return stem[: m.start()] if m and m.start() > 0 else None


class DatasetError(ValueError):
    """A dataset folder that cannot be used; the message names the files or folders at fault."""


@dataclass(frozen=True)
class Sample:
    """One image with its mask files (their union is the mask).

    Attributes:
        name: unique id within the dataset (file stem; ``group/stem`` for BUSI).
        image: image file.
        masks: mask files; several for some BUSI images.
        group: subgroup (BUSI class), used for stratified splits and per-group tables.
        patient: patient id (LGG), used to keep a patient in one split.
    """

    name: str
    image: Path
    masks: tuple[Path, ...]
    group: str | None = None
    patient: str | None = None


def _pairs_by_stem(images_dir: Path, masks_dir: Path) -> tuple[list[Sample], list[str]]:
    images, masks = list_images(images_dir), list_images(masks_dir)
    by_stem = {}
    problems = []
    for m in masks:
        if m.stem in by_stem:
            problems.append(f"two masks share the stem {m.stem!r}: {by_stem[m.stem]} and {m}")
        by_stem[m.stem] = m
    samples = []
    seen = set()
    for img in images:
        if img.stem in seen:
            problems.append(f"two images share the stem {img.stem!r} in {images_dir}")
            continue
        seen.add(img.stem)
        if img.stem not in by_stem:
            problems.append(f"image without mask: {img} (expected {masks_dir}/{img.stem}.*)")
            continue
        samples.append(Sample(img.stem, img, (by_stem[img.stem],)))
    for stem in sorted(set(by_stem) - seen):
        problems.append(f"mask without image: {by_stem[stem]}")
    return samples, problems


def _busi_root(root: Path) -> Path:
    inner = root / "Dataset_BUSI_with_GT"
    return inner if inner.is_dir() else root


def _lgg_root(root: Path) -> Path:
    inner = root / "kaggle_3m"
    return inner if inner.is_dir() else root


def _find_dir(root: Path, *names: str) -> Path | None:
    for n in names:
        for cand in (root / n, root / n.lower(), root / n.title()):
            if cand.is_dir():
                return cand
    return None


def detect_format(root: str | Path) -> str:
    """Guess the layout of ``root``; raises :class:`DatasetError` when none fits."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such dataset folder: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    if _find_dir(root, "Original") and _find_dir(root, "Ground Truth"):
        return "cvc"
    busi = _busi_root(root)
    if any((busi / c).is_dir() and any((busi / c).glob("*_mask*.png")) for c in BUSI_CLASSES):
        return "busi"
    lgg = _lgg_root(root)
    if any(lgg.glob("*/*_mask.tif")):
        return "lgg"
    if _find_dir(root, "images") and _find_dir(root, "masks"):
        masks = list_images(_find_dir(root, "masks"))
        if (root / "kavsir_bboxes.json").exists() or (masks and all(
                m.suffix.lower() in (".jpg", ".jpeg") for m in masks)):
            return "kvasir"
        return "generic"
    raise DatasetError(
        f"cannot tell the layout of {root}: expected images/ + masks/ (generic, Kvasir-SEG), "
        "benign/ malignant/ normal/ (BUSI), kaggle_3m/<patient>/ (LGG) or Original/ + "
        "Ground Truth/ (CVC-ClinicDB); name one with --format"
    )


def _discover_busi(root: Path) -> tuple[list[Sample], list[str]]:
    root = _busi_root(root)
    samples, problems = [], []
    classes = [c for c in BUSI_CLASSES if (root / c).is_dir()]
    if not classes:
        raise DatasetError(f"{root}: no benign/, malignant/ or normal/ folder")
    for cls in classes:
        files = list_images(root / cls)
        masks: dict[str, list[Path]] = {}
        images = []
        for f in files:
            owner = mask_owner(f.stem)
            if owner:
                masks.setdefault(owner, []).append(f)
            else:
                images.append(f)
        for img in images:
            if img.stem not in masks:
                problems.append(f"image without mask: {img} (expected {img.stem}_mask.png)")
                continue
            samples.append(Sample(f"{cls}/{img.stem}", img, tuple(sorted(masks[img.stem])), cls))
        for stem in sorted(set(masks) - {i.stem for i in images}):
            problems.append(f"mask without image: {masks[stem][0]}")
    return samples, problems


def _discover_lgg(root: Path) -> tuple[list[Sample], list[str]]:
    root = _lgg_root(root)
    samples, problems = [], []
    for patient_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = list_images(patient_dir)
        masks = {f.stem[: -len("_mask")]: f for f in files if f.stem.endswith("_mask")}
        for img in (f for f in files if not f.stem.endswith("_mask")):
            if img.stem not in masks:
                problems.append(f"slice without mask: {img}")
                continue
            samples.append(Sample(img.stem, img, (masks[img.stem],), None, patient_dir.name))
        for stem in sorted(set(masks) - {f.stem for f in files}):
            problems.append(f"mask without slice: {masks[stem]}")
    return samples, problems


def discover(root: str | Path, fmt: str | None = None) -> tuple[str, list[Sample], list[str]]:
    """Find the samples of a dataset folder.

    Args:
        root: dataset folder as downloaded.
        fmt: one of :data:`FORMATS`, or ``None`` to detect it.

    Returns:
        ``(format, samples, problems)``; ``problems`` lists unmatched files, one line each.
    """
    root = Path(root)
    fmt = fmt or detect_format(root)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"no such dataset folder: {root}")
    if fmt == "busi":
        samples, problems = _discover_busi(root)
    elif fmt == "lgg":
        samples, problems = _discover_lgg(root)
    elif fmt == "cvc":
        images, masks = _find_dir(root, "Original"), _find_dir(root, "Ground Truth")
        if images is None or masks is None:
            raise DatasetError(f"{root}: CVC-ClinicDB needs Original/ and 'Ground Truth/' folders")
        samples, problems = _pairs_by_stem(images, masks)
    else:
        images, masks = _find_dir(root, "images"), _find_dir(root, "masks")
        if images is None or masks is None:
            raise DatasetError(f"{root}: the {fmt} layout needs images/ and masks/ folders")
        samples, problems = _pairs_by_stem(images, masks)
    if not samples:
        raise DatasetError(f"no image/mask pairs found in {root} (format {fmt})"
                           + (f"; first problem: {problems[0]}" if problems else ""))
    return fmt, samples, problems
