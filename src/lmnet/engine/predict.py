"""``lmnet predict``: masks at each image's own size, overlays and a CSV of lesion areas."""
from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from lmnet.data.io import IMAGE_SUFFIXES, list_images, read_image
from lmnet.data.layouts import mask_owner
from lmnet.deploy.engines import (
    ENGINES,
    load_predictor,
    precision_context,
    predict_probabilities,
    probabilities_to_mask,
)
from lmnet.deploy.preprocess import preprocess

__all__ = ["collect_inputs", "output_names", "overlay", "predict_files", "PredictionSummary"]

log = logging.getLogger(__name__)


@dataclass
class PredictionSummary:
    """What :func:`predict_files` did: written masks and the files it could not process."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    csv_path: Path | None = None
    skipped: dict[str, list[Path]] = field(default_factory=dict)  # why -> files left out


def collect_inputs(inputs: Sequence[str | Path], exclude: str | Path | None = None,
                   skipped: dict[str, list[Path]] | None = None) -> list[Path]:
    """Image files from a mix of files and folders (folders searched recursively), without repeats.

    In folders, files under ``exclude`` (the output folder) and ground-truth mask files
    (:func:`~lmnet.data.layouts.mask_owner`, or inside a folder named ``masks``) are left out and listed in
    ``skipped`` under ``"output folder"`` and ``"mask files"``; files named one by one are kept.
    """
    files: list[Path] = []
    skipped = skipped if skipped is not None else {}
    excluded = Path(exclude).resolve() if exclude is not None else None
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in list_images(p, recursive=True):
                if excluded is not None and f.resolve().is_relative_to(excluded):
                    skipped.setdefault("output folder", []).append(f)
                elif mask_owner(f.stem) or "masks" in f.relative_to(p).parts[:-1]:
                    skipped.setdefault("mask files", []).append(f)
                else:
                    files.append(f)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    seen: set[Path] = set()
    files = [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]  # no repeats
    if not files:
        left = "; ".join(f"{len(v)} {k} skipped" for k, v in skipped.items())
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}"
                         + (f" ({left})" if left else ""))
    return files


def output_names(files: Sequence[Path]) -> list[str]:
    """A unique, stable output name (no suffix) for each input file.

    The stem when no other input shares it; stems shared by files of different types get the
    type (``dup_jpg``, ``dup_png``); names that still collide (same name in different folders) get
    their parent folders' names in front, one more level at a time, until they differ. The names
    depend on the set of inputs only, not on their order.
    """
    by_stem: dict[str, set[str]] = {}
    for f in files:
        by_stem.setdefault(f.stem, set()).add(f.suffix.lower())
    bases = [f"{f.stem}_{f.suffix[1:].lower()}" if len(by_stem[f.stem]) > 1 else f.stem for f in files]
    names = list(bases)
    for level in range(1, 256):
        counts = Counter(names)
        if all(counts[n] == 1 for n in names):
            return names
        names = [n if counts[n] == 1 else
                 "_".join([*f.resolve().parent.parts[-level:], base])
                 for f, n, base in zip(files, names, bases)]
    raise ValueError("cannot give the inputs distinct output names")  # pragma: no cover


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB ``uint8`` image with the lesion tinted red and its boundary drawn in yellow."""
    from scipy import ndimage

    rgb = image[..., :3] if image.shape[2] >= 3 else np.repeat(image[..., :1], 3, axis=2)
    out = rgb.astype(np.float32)
    red = np.array([255, 0, 0], np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * red
    edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
    out[edge] = (255, 255, 0)
    return out.clip(0, 255).astype(np.uint8)


def predict_files(checkpoint: str | Path | None, inputs: Sequence[str | Path], out_dir: str | Path,
                  threshold: float = 0.5, progress: bool = True, engine: str = "torch",
                  precision: str = "fp32", weights: str | Path | None = None) -> PredictionSummary:
    """Predict every image; write ``masks/NAME.png`` (0/255), ``overlays/NAME.png``, ``areas.csv``.

    ``checkpoint`` is a checkpoint, a run folder, or (with ``engine="onnx"``) an ONNX file from
    ``lmnet export``; or None with pretrained ``weights`` (see :func:`lmnet.from_pretrained`).
    With ``engine="onnx"`` and a checkpoint or weights, the model is exported to a temporary
    file first (nothing is left behind). Output files are named by :func:`output_names`; folders
    skip ground-truth masks and the output folder (``summary.skipped``). A file that cannot be
    read or predicted is reported and skipped; see ``summary.failed``.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(ENGINES)}")
    if precision != "fp32" and engine == "onnx":
        raise ValueError(f"precision {precision!r} is available with --engine torch or openvino")
    out = Path(out_dir)
    summary = PredictionSummary(csv_path=out / "areas.csv")
    files = collect_inputs(inputs, exclude=out, skipped=summary.skipped)
    names = output_names(files)
    model, cfg = load_predictor(checkpoint, engine, weights, precision)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    rows = []
    for path, stem in zip(tqdm(files, desc="predicting", unit="img", disable=not progress), names):
        try:
            image = read_image(path, cfg.in_channels)
            x = preprocess([image], cfg.image_size, cfg.mean, cfg.std)
            with precision_context(precision if engine == "torch" else "fp32"):
                prob = predict_probabilities(model, x, image.shape[:2])
            mask = probabilities_to_mask(prob, threshold)[0]
        except Exception as err:  # noqa: BLE001 - report and go on with the next file
            msg = str(err) if str(path) in str(err) else f"{path}: {err}"
            summary.failed.append((path, msg))
            tqdm.write(f"skipped: {msg}")
            continue
        mask_path = out / "masks" / f"{stem}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        Image.fromarray(overlay(image, mask)).save(out / "overlays" / f"{stem}.png")
        summary.written.append(mask_path)
        area = int(mask.sum())
        rows.append({"file": str(path), "mask": str(mask_path), "height": mask.shape[0],
                     "width": mask.shape[1], "lesion_area_px": area,
                     "lesion_fraction": round(area / mask.size, 6)})
    with summary.csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["file", "mask", "height", "width", "lesion_area_px", "lesion_fraction"])
        w.writeheader()
        w.writerows(rows)
    return summary
