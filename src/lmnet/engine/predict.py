"""``lmnet predict``: masks at each image's own size, overlays and a CSV of lesion areas."""
from __future__ import annotations

import csv
import logging
import math
import threading
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from lmnet._files import atomic_path, check_writable_file
from lmnet.data.io import IMAGE_SUFFIXES, list_images, read_image
from lmnet.data.layouts import mask_owner
from lmnet.deploy.backends import precision_context
from lmnet.deploy.loading import (
    BF16_AGREEMENT,
    ENGINE_CHOICES,
    PRECISION_CHOICES,
    load_predictor,
)
from lmnet.deploy.postprocess import TTA_CHOICES, TTA_HELP, PostProcess, count_lesions
from lmnet.deploy.preprocess import preprocess
from lmnet.runtime import ThreadGovernor

__all__ = ["PredictConfig", "predict", "collect_inputs", "output_names", "overlay", "predict_files", "PredictionSummary",
           "AREA_FIELDS", "OUTPUT_FOLDERS", "PROBABILITY_FORMATS", "check_threshold"]

#: Columns of ``areas.csv``.
AREA_FIELDS = ("file", "mask", "height", "width", "lesion_area_px", "lesion_fraction", "n_lesions")
#: The folders ``predict`` writes inside ``--out`` (left out when ``--out`` lies inside an input).
OUTPUT_FOLDERS = ("masks", "overlays", "probabilities")
#: ``--save-probabilities`` formats: a 16-bit PNG (probability x 65535) or a float32 ``.npy``.
PROBABILITY_FORMATS = ("png", "npy")

log = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    """What ``lmnet predict`` predicts and how; its flags are these fields (the model and the
    inputs are its positional arguments)."""

    checkpoint: str | None = None       # checkpoint file, run folder or exported .onnx/.xml file
    inputs: list[str] = field(default_factory=list)  # image files or folders
    weights: str | None = field(default=None, metadata={"metavar": "NAME", "help": (
        "a pretrained model: a shipped name (kvasir), a folder or a Hugging Face Hub id org/name")})
    out: str = field(default="", metadata={"required": True})  # output folder
    tta: str = field(default="flips", metadata={"choices": TTA_CHOICES, "help": (
        TTA_HELP + " (flips measured +2.1 points of foreground Dice on the shipped model's test "
        "split, for 3.8x the time)")})
    keep_largest: bool = False          # keep only the largest connected lesion (8-connected) of each mask
    min_lesion_pixels: int = field(default=0, metadata={"metavar": "N", "help": (
        "drop lesions of fewer than N pixels (of the mask as scored or written)")})
    threshold: float = 0.5              # lesion probability threshold, in [0, 1]
    save_probabilities: str | None = field(default=None, metadata={
        "nargs": "?", "const": "png", "choices": PROBABILITY_FORMATS, "metavar": "{png,npy}",
        "help": "also write probabilities/NAME.png (16-bit, lesion probability x 65535) or .npy "
                "(float32), at the image's size, before threshold and clean-up"})
    overwrite: bool = field(default=False, metadata={"help": (
        "write into an --out that holds an earlier prediction: masks of the same names are "
        "replaced, areas.csv keeps the rows of the other masks")})
    precision: str = field(default="auto", metadata={"choices": PRECISION_CHOICES, "help": (
        "inference precision (torch: bf16/fp16 autocast, fp16 on CUDA only; openvino: bf16 "
        "hint); auto: fp32, or bf16 where this CPU has it in hardware, it is faster and its "
        f"masks of the shipped sample agree with fp32's at Dice >= {BF16_AGREEMENT} (mean over "
        "the shipped sample's 40 images; measured once, with the backend probe)")})
    backend: str = field(default="auto", metadata={"choices": ENGINE_CHOICES, "help": (
        "auto: the fastest installed backend for this machine and batch size, measured once and "
        "cached (delete ~/.cache/lmnet/engines.json to measure again); or PyTorch, ONNX Runtime, "
        "OpenVINO (the model may then be an exported .onnx or .xml file)")})
    batch_size: int = 1                 # images per forward pass (decoding and writing overlap it in threads)


def predict(cfg: PredictConfig, progress: bool = True) -> PredictionSummary:
    """``lmnet predict``: :func:`predict_files` as ``cfg`` says."""
    if not cfg.out:
        raise ValueError("give an output folder (--out)")
    if (cfg.checkpoint is None) == (cfg.weights is None):
        raise ValueError("give a checkpoint (or run folder) or --weights NAME, not both or neither")
    if not cfg.inputs:
        raise ValueError("give at least one image or folder to predict")
    return predict_files(cfg.checkpoint, cfg.inputs, cfg.out, cfg.threshold, progress,
                         cfg.backend, cfg.precision, cfg.weights, cfg.batch_size,
                         overwrite=cfg.overwrite, tta=cfg.tta, keep_largest=cfg.keep_largest,
                         min_lesion_pixels=cfg.min_lesion_pixels,
                         save_probabilities=cfg.save_probabilities)


@dataclass
class PredictionSummary:
    """What :func:`predict_files` did: written masks and the files it could not process."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    csv_path: Path | None = None
    skipped: dict[str, list[Path]] = field(default_factory=dict)  # why -> files left out
    engine: str = ""  # the engine that ran
    note: str = ""  # how it was chosen (engine auto)
    post: PostProcess | None = None  # test-time augmentation and clean-up used


def collect_inputs(inputs: Sequence[str | Path], exclude: str | Path | None = None,
                   skipped: dict[str, list[Path]] | None = None) -> list[Path]:
    """Image files from a mix of files and folders (folders searched recursively), without repeats.

    In folders, files under ``exclude`` (the output folder: only the folders ``predict`` writes
    there, :data:`OUTPUT_FOLDERS`, so ``--out .`` still reads the inputs beside them) and
    ground-truth mask files (:func:`~lmnet.data.layouts.mask_owner`, or inside a folder named
    ``masks``) are left out and listed in ``skipped`` under ``"output folder"`` and
    ``"mask files"``; files named one by one are kept.
    """
    files: list[Path] = []
    skipped = skipped if skipped is not None else {}
    excluded = ([(Path(exclude) / name).resolve() for name in OUTPUT_FOLDERS]
                if exclude is not None else [])
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in list_images(p, recursive=True):
                if any(f.resolve().is_relative_to(e) for e in excluded):
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


def _erode_cross(mask: np.ndarray) -> np.ndarray:
    """One binary erosion by the 3 x 3 cross, pixels outside the image counting as background
    (as ``scipy.ndimage.binary_erosion``'s default): four shifted ANDs, no per-pixel loop."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0] = out[-1] = False
    out[:, 0] = out[:, -1] = False
    return out


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB ``uint8`` image with the lesion tinted red and its boundary (the lesion pixels within
    2 pixels of the background, 4-connected) drawn in yellow. Only lesion pixels are computed."""
    mask = np.asarray(mask, dtype=bool)
    rgb = image[..., :3] if image.shape[2] >= 3 else np.repeat(image[..., :1], 3, axis=2)
    out = np.array(rgb if rgb.dtype == np.uint8 else rgb.clip(0, 255), dtype=np.uint8, copy=True)
    tinted = (1 - alpha) * out[mask].astype(np.float32) + alpha * np.array([255, 0, 0], np.float32)
    out[mask] = tinted.clip(0, 255).astype(np.uint8)
    out[mask & ~_erode_cross(_erode_cross(mask))] = (255, 255, 0)
    return out


def _read(path: Path, channels: int, size: int, mean: Sequence[float], std: Sequence[float]
          ) -> tuple[np.ndarray, torch.Tensor]:
    image = read_image(path, channels)
    return image, preprocess([image], size, mean, std)[0]


def _save_png(array: np.ndarray, path: Path, **options: Any) -> None:
    """A PNG written whole or not at all (a hidden ``.part`` file renamed when complete)."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", **options)


def check_threshold(threshold: float) -> float:
    """``threshold`` if it is a probability in [0, 1], else ``ValueError``."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)
            and 0.0 <= threshold <= 1.0):
        raise ValueError(f"--threshold is a lesion probability in [0, 1], got {threshold!r}")
    return float(threshold)


class _AreasTable:
    """``areas.csv``, kept consistent with ``masks/`` on disk: every row's mask file exists and
    holds the row's numbers. A row is appended (and flushed) right after its mask is renamed into
    place; with ``keep``, rows of an earlier prediction whose masks exist and are not predicted
    again stay, rewritten atomically before any mask is replaced."""

    def __init__(self, path: Path, keep: bool, replacing: set[str]) -> None:
        self.path = path
        kept = []
        if keep and path.is_file():
            try:
                with path.open(newline="") as fh:
                    kept = [r for r in csv.DictReader(fh)
                            if r.get("mask") and r["mask"] not in replacing and Path(r["mask"]).is_file()]
            except (OSError, csv.Error, UnicodeDecodeError):
                kept = []
        self.rows = len(kept)
        with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, AREA_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(kept)
        self._fh = path.open("a", newline="")
        self._writer = csv.DictWriter(self._fh, AREA_FIELDS)
        self._lock = threading.Lock()

    def add(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._writer.writerow(row)
            self._fh.flush()
            self.rows += 1

    def close(self, order: Sequence[Path] = ()) -> None:
        """Close the file; with ``order`` (the inputs), rewrite it atomically with this run's
        rows in input order (they were appended as their writes finished), earlier rows first."""
        self._fh.close()
        if not order:
            return
        rank = {str(p): i for i, p in enumerate(order)}
        with self.path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        rows.sort(key=lambda r: rank.get(r["file"], -1))
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, AREA_FIELDS)
            w.writeheader()
            w.writerows(rows)


def _write(image: np.ndarray, mask: np.ndarray, mask_path: Path, overlay_path: Path,
           table: _AreasTable, row: dict[str, Any], prob: np.ndarray | None = None,
           prob_path: Path | None = None) -> None:
    if prob is not None and prob_path is not None:  # before the mask: a row means all files exist
        if prob_path.suffix == ".npy":
            with atomic_path(prob_path) as tmp, tmp.open("wb") as fh:
                np.save(fh, prob.astype(np.float32))
        else:
            _save_png(np.round(prob * 65535).astype(np.uint16), prob_path)
    # zlib level 1: a sixth of the default's encoding time for 10 % larger files (the overlay is a
    # photograph; at level 6 encoding it took as long as the model's forward pass).
    _save_png(overlay(image, mask), overlay_path, compress_level=1)
    _save_png(mask.astype(np.uint8) * 255, mask_path)  # the mask last, then its row
    table.add(row)


def _remove_stale_parts(out: Path) -> None:
    """Delete the hidden ``.NAME.PID.*.part`` files a killed earlier run left (never under a final
    name; their process is gone)."""
    import os

    for name in OUTPUT_FOLDERS:
        for part in (out / name).glob(".*.part"):
            try:
                pid = int(part.name.split(".")[-4])
                os.kill(pid, 0)  # still running: its write may yet finish
            except ProcessLookupError:
                part.unlink(missing_ok=True)
            except (ValueError, IndexError, PermissionError, OSError):
                continue


def earlier_outputs(out: Path) -> list[Path]:
    """What an earlier ``predict`` left in ``out``: ``areas.csv`` and the PNGs of its folders."""
    found = [out / "areas.csv"] if (out / "areas.csv").is_file() else []
    for name in OUTPUT_FOLDERS:
        if (out / name).is_dir():
            found += [p for p in (out / name).iterdir() if p.suffix in (".png", ".npy")]
    return found


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that cannot be written, or that holds an earlier prediction unless
    ``overwrite``: nothing is created before these checks pass."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    for name in OUTPUT_FOLDERS:
        if (out / name).exists() and not (out / name).is_dir():
            raise ValueError(f"{out / name} is a file; predict writes a folder of that name")
    check_writable_file(out / "areas.csv", "output")
    earlier = earlier_outputs(out)
    if earlier and not overwrite:
        n = sum(p.suffix == ".png" and p.parent.name == "masks" for p in earlier)
        raise ValueError(f"--out {out} holds an earlier prediction ({n} masks"
                         f"{', areas.csv' if (out / 'areas.csv').is_file() else ''}): pass "
                         "--overwrite to add to it (files of the same name are replaced, "
                         "areas.csv keeps the rows of the other masks), or choose a new folder")


def predict_files(checkpoint: str | Path | None, inputs: Sequence[str | Path], out_dir: str | Path,
                  threshold: float = 0.5, progress: bool = True, backend: str = "auto",
                  precision: str = "fp32", weights: str | Path | None = None,
                  batch_size: int = 1, io_threads: int = 2, overwrite: bool = False,
                  tta: str = "none", keep_largest: bool = False, min_lesion_pixels: int = 0,
                  save_probabilities: str | None = None, engine: str | None = None
                  ) -> PredictionSummary:
    """Predict every image; write ``masks/NAME.png`` (0/255), ``overlays/NAME.png``, ``areas.csv``.

    ``checkpoint`` is a checkpoint, a run folder, or an exported ``.onnx``/``.xml`` file from
    ``lmnet export``; or None with pretrained ``weights`` (see :func:`lmnet.from_pretrained`).
    ``backend``: ``auto`` (the fastest installed backend here, measured once and cached; see
    :func:`~lmnet.deploy.loading.choose_engine`), ``torch``, ``onnx`` or ``openvino``
    (``engine``: its old name); the summary's ``engine`` and ``note`` say which ran. Images go through the model ``batch_size``
    at a time while ``io_threads`` threads decode the next ones and write the finished ones
    (0: all in this thread). Output files are named by :func:`output_names`; folders skip
    ground-truth masks and the output folder (``summary.skipped``). A file that cannot be read or
    predicted is reported and skipped; see ``summary.failed``.

    An ``out_dir`` holding an earlier prediction is refused unless ``overwrite``; then masks of
    the same names are replaced and ``areas.csv`` keeps the rows of the others. Every file is
    written whole (a temporary name, renamed), and each row of ``areas.csv`` is appended right
    after its mask: a command interrupted at any point (kill -9 included) leaves no truncated
    PNG, and every row of ``areas.csv`` describes a mask on disk.

    ``tta``: test-time augmentation (``none``, ``hflip``, ``flips``: the lesion probabilities of
    flipped copies averaged); ``keep_largest``, ``min_lesion_pixels``: mask clean-up at the
    image's own size (:class:`~lmnet.deploy.postprocess.PostProcess`). ``save_probabilities``
    (``png`` or ``npy``): also ``probabilities/NAME.png`` (16-bit, probability x 65535) or
    ``.npy`` (float32), the lesion probability at the image's size before threshold and clean-up.
    ``precision``: ``fp32``, ``bf16``, ``fp16`` (CUDA) or ``auto`` (see
    :func:`~lmnet.deploy.loading.choose_engine`).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if io_threads < 0:
        raise ValueError(f"I/O threads must be 0 or more, got {io_threads}")
    threshold = check_threshold(threshold)
    post = PostProcess(tta, threshold, keep_largest, min_lesion_pixels)
    if save_probabilities not in (None, *PROBABILITY_FORMATS):
        raise ValueError(f"--save-probabilities takes {' or '.join(PROBABILITY_FORMATS)}, "
                         f"got {save_probabilities!r}")
    out = Path(out_dir)
    _check_out(out, overwrite)
    summary = PredictionSummary(csv_path=out / "areas.csv")
    files = collect_inputs(inputs, exclude=out, skipped=summary.skipped)
    names = output_names(files)
    predictor = load_predictor(checkpoint, engine or backend, weights, precision, batch_size)
    model, cfg = predictor.model, predictor.cfg
    summary.engine, summary.note = predictor.engine, predictor.note
    summary.post = post
    autocast = predictor.precision if predictor.engine == "torch" else "fp32"
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    if save_probabilities:
        (out / "probabilities").mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(out)
    table = _AreasTable(summary.csv_path, keep=overwrite,
                        replacing={str(out / "masks" / f"{n}.png") for n in names})
    pool = ThreadPoolExecutor(io_threads) if io_threads else None
    governor = ThreadGovernor(enabled=None if predictor.engine == "torch" else False)

    def submit(fn: Any, *args: Any) -> Future:
        if pool is not None:
            return pool.submit(fn, *args)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 - surfaced by future.result()
            future.set_exception(err)
        return future

    def fail(path: Path, err: Exception) -> None:
        msg = str(err) if str(path) in str(err) else f"{path}: {err}"
        summary.failed.append((path, msg))
        tqdm.write(f"skipped: {msg}")

    reads: deque[tuple[Path, str, Future]] = deque()
    todo = iter(zip(files, names))
    writes: list[tuple[Path, Path, dict[str, Any], Future]] = []
    pending: deque[Future] = deque()
    bar = tqdm(total=len(files), desc="predicting", unit="img", disable=not progress)
    try:
        while True:
            while len(reads) < batch_size * 2 and (item := next(todo, None)) is not None:
                reads.append((*item, submit(_read, item[0], cfg.in_channels, cfg.image_size,
                                            cfg.mean, cfg.std)))
            if not reads:
                break
            batch = []
            while reads and len(batch) < batch_size:
                path, stem, future = reads.popleft()
                try:
                    batch.append((path, stem, *future.result()))
                except Exception as err:  # noqa: BLE001 - report and go on with the next file
                    fail(path, err)
                    bar.update()
            if not batch:
                continue
            try:
                with precision_context(autocast):
                    probs = post.probabilities(model, torch.stack([b[3] for b in batch]))
            except Exception as err:  # noqa: BLE001 - the batch's files fail, the rest go on
                for path, *_ in batch:
                    fail(path, err)
                bar.update(len(batch))
                continue
            for (path, stem, image, _), prob in zip(batch, probs):
                size = image.shape[:2]
                if tuple(prob.shape) != tuple(size):
                    prob = F.interpolate(prob[None, None], size=size, mode="bilinear",
                                         align_corners=False)[0, 0]
                mask = post.mask(prob)
                mask_path = out / "masks" / f"{stem}.png"
                area = int(mask.sum())  # the row now: no mask is kept after its writing
                row = {"file": str(path), "mask": str(mask_path), "height": mask.shape[0],
                       "width": mask.shape[1], "lesion_area_px": area,
                       "lesion_fraction": round(area / mask.size, 6),
                       "n_lesions": count_lesions(mask)}
                keep_prob = prob.numpy() if save_probabilities else None
                prob_path = out / "probabilities" / f"{stem}.{save_probabilities or 'png'}"
                writes.append((path, mask_path, row, submit(
                    _write, image, mask, mask_path, out / "overlays" / f"{stem}.png", table, row,
                    keep_prob, prob_path)))
                pending.append(writes[-1][3])
                while len(pending) > 2 * batch_size + 2:  # bounded: images wait in memory
                    wait([pending.popleft()])
            bar.update(len(batch))
            governor.update()  # fewer threads while other processes hold cores
    finally:
        if pool is not None:
            pool.shutdown(wait=True)  # every started write finishes, even on Ctrl-C
        bar.close()
        table.close()
    table.close(files)  # finished: this run's rows in input order
    for path, mask_path, row, future in writes:
        try:
            future.result()
        except Exception as err:  # noqa: BLE001 - a file that cannot be written is reported
            fail(path, err)
            continue
        summary.written.append(mask_path)
    return summary
