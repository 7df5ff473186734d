"""``lmnet predict``: masks at each image's own size, overlays and a CSV of lesion areas."""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from lmnet.data.io import IMAGE_SUFFIXES, list_images, read_image
from lmnet.inference.engine import (
    precision_context,
    predict_probabilities,
    preprocess,
    probabilities_to_mask,
)
from lmnet.train.checkpoint import model_from_checkpoint, resolve_checkpoint
from lmnet.train.config import TrainConfig

__all__ = ["ENGINES", "collect_inputs", "overlay", "predict_files", "PredictionSummary",
           "load_predictor"]

ENGINES = ("torch", "onnx")


def load_predictor(checkpoint: str | Path, engine: str = "torch") -> tuple[Any, TrainConfig]:
    """A deployed PyTorch model, or an ONNX Runtime function, and the training config."""
    path = Path(checkpoint)
    if engine == "torch":
        if path.suffix == ".onnx":
            raise ValueError(f"{path} is an ONNX file: use --engine onnx")
        return model_from_checkpoint(path)
    from lmnet.inference.export import export_checkpoint, load_exported, onnx_config

    if path.suffix != ".onnx":
        ckpt = resolve_checkpoint(path)
        onnx_path = ckpt.with_suffix(".onnx")
        if not onnx_path.is_file() or onnx_path.stat().st_mtime < ckpt.stat().st_mtime:
            export_checkpoint(ckpt, "onnx", onnx_path, check=False)
        path = onnx_path
    elif not path.is_file():
        raise FileNotFoundError(f"no such ONNX file: {path}")
    cfg = onnx_config(path)  # checks the file first: a clear error for files that are not ours
    return load_exported(path, "onnx"), cfg

log = logging.getLogger(__name__)


@dataclass
class PredictionSummary:
    """What :func:`predict_files` did: written masks and the files it could not process."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    csv_path: Path | None = None


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files from a mix of files and folders (folders searched recursively)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(list_images(p, recursive=True))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    return files


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


def predict_files(checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
                  threshold: float = 0.5, progress: bool = True, engine: str = "torch",
                  precision: str = "fp32") -> PredictionSummary:
    """Predict every image; write ``masks/NAME.png`` (0/255), ``overlays/NAME.png``, ``areas.csv``.

    ``checkpoint`` is a checkpoint, a run folder, or (with ``engine="onnx"``) an ONNX file from
    ``lmnet export``; with ``engine="onnx"`` and a checkpoint, the model is exported next to it
    first (``<checkpoint>.onnx``). A file that cannot be read or predicted is reported and skipped;
    see ``summary.failed``.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(ENGINES)}")
    if precision != "fp32" and engine != "torch":
        raise ValueError(f"precision {precision!r} is available with --engine torch only")
    files = collect_inputs(inputs)
    model, cfg = load_predictor(checkpoint, engine)
    out = Path(out_dir)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    summary = PredictionSummary(csv_path=out / "areas.csv")
    rows = []
    used: set[str] = set()
    for path in tqdm(files, desc="predicting", unit="img", disable=not progress):
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
        stem = path.stem if path.stem not in used else f"{path.parent.name}_{path.stem}"
        used.add(stem)
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
