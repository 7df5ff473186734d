"""``lmnet evaluate``: score a model on a list of samples (validation during training) or a trained
run on a split of its dataset, at the training size or at each image's own size."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lmnet._files import atomic_write_text
from lmnet.config import TrainConfig
from lmnet.data.dataset import SegmentationDataset, load_sample
from lmnet.data.layouts import Sample, discover
from lmnet.data.splits import SPLITS, check_split, load_split
from lmnet.deploy.backends import ENGINE_FILES, PRECISIONS, precision_context
from lmnet.deploy.checkpoint import model_source, resolve_checkpoint
from lmnet.deploy.loading import ENGINE_CHOICES, load_predictor, stored_split
from lmnet.deploy.metadata import exported_metadata
from lmnet.deploy.postprocess import TTA_CHOICES, TTA_HELP, PostProcess
from lmnet.deploy.preprocess import preprocess
from lmnet.engine.distributed import resolve_device
from lmnet.metrics import SegmentationEvaluator, write_report
from lmnet.metrics.evaluator import summarize
from lmnet.run_folder import RunFolder

__all__ = ["EvaluateConfig", "evaluate", "evaluate_samples", "evaluate_run", "GRIDS"]

log = logging.getLogger(__name__)

#: ``resized``: score at image_size x image_size, as the paper; ``original``: at each image's size.
GRIDS = ("resized", "original")


@dataclass
class EvaluateConfig:
    """What ``lmnet evaluate`` scores and how; its flags are these fields."""

    run: str | None = field(default=None, metadata={"positional": "?"})  # run folder or checkpoint file
    weights: str | None = field(default=None, metadata={"metavar": "NAME", "help": (
        "a pretrained model instead of a run: a shipped name (kvasir), a folder or a Hugging Face "
        "Hub id org/name")})
    data: str | None = None             # dataset folder (default: the run's)
    split: str = field(default="test", metadata={"choices": (*SPLITS, "all")})  # the part scored
    split_file: str | None = None       # split JSON (default: the split the model stores)
    grid: str = field(default="resized", metadata={"choices": GRIDS})  # score at the training size (paper) or each image's own
    spacing: list[float] | None = field(default=None, metadata={"nargs": 2, "metavar": ("SY", "SX")})  # pixel size for boundary metrics
    device: str = "auto"                # auto (a CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N
    precision: str = field(default="fp32", metadata={"choices": PRECISIONS, "help": (
        "inference precision (torch: bf16/fp16 autocast, fp16 on CUDA only; openvino: bf16 hint)")})
    backend: str | None = field(default=None, metadata={"choices": ENGINE_CHOICES, "help": (
        "PyTorch, ONNX Runtime or OpenVINO (the model is converted on the fly), or auto: the "
        "fastest here, measured (default: torch; an exported .onnx or .xml RUN runs on its own "
        "backend)")})
    out: str | None = None              # report folder (default: RUN/eval_<split>_<grid>)
    tta: str = field(default="none", metadata={"choices": TTA_CHOICES, "help": TTA_HELP})
    keep_largest: bool = False          # keep only the largest connected lesion (8-connected) of each mask
    min_lesion_pixels: int = field(default=0, metadata={"metavar": "N", "help": (
        "drop lesions of fewer than N pixels (of the mask as scored or written)")})

    def post(self) -> PostProcess:
        """The test-time augmentation and clean-up these fields ask for."""
        return PostProcess(self.tta, 0.5, self.keep_largest, self.min_lesion_pixels)


def evaluate(cfg: EvaluateConfig, progress: bool = True, overlap_warning: bool = True
             ) -> tuple[dict[str, Any], Path]:
    """``lmnet evaluate``: :func:`evaluate_run` as ``cfg`` says; returns the metrics and the
    report folder."""
    if (cfg.run is None) == (cfg.weights is None):
        raise ValueError("give a run folder (or checkpoint) or --weights NAME, not both or neither")
    return evaluate_run(cfg.run, cfg.data, cfg.split, cfg.split_file, cfg.grid, cfg.out,
                        tuple(cfg.spacing) if cfg.spacing else None, cfg.device, progress,
                        cfg.precision, cfg.weights, backend=cfg.backend, post=cfg.post(),
                        overlap_warning=overlap_warning)


@torch.inference_mode()
def evaluate_samples(model: nn.Module | Callable[[np.ndarray], np.ndarray], samples: Sequence[Sample], cfg: TrainConfig,
                     grid: str = "resized", boundary: bool = True, batch_size: int = 8,
                     dataset: SegmentationDataset | None = None, progress: bool = False,
                     spacing: tuple[float, float] | None = None,
                     post: PostProcess | None = None) -> SegmentationEvaluator:
    """Predict every sample and score it; returns the filled evaluator (rows carry names, groups).

    ``model``: a PyTorch module or an engine's function (numpy batch -> numpy logits). ``post``:
    test-time augmentation and mask clean-up (:class:`~lmnet.deploy.postprocess.PostProcess`;
    default none: the probabilities thresholded at 0.5)."""
    post = post or PostProcess()
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if isinstance(model, nn.Module):
        model.eval()
    ev = SegmentationEvaluator(spacing=spacing, boundary=boundary)
    if grid == "resized":
        ds = dataset or SegmentationDataset(samples, cfg.image_size, False, cfg.in_channels,
                                            cfg.mean, cfg.std, cache=False)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
        for x, y, idx in tqdm(loader, desc="evaluating", unit="batch", disable=not progress):
            mask = post.mask(post.probabilities(model, x))
            names = [ds.samples[i].name for i in idx.tolist()]
            groups = [ds.samples[i].group for i in idx.tolist()]
            ev.update(mask, y.numpy().astype(bool), names, groups)
        return ev
    for s in tqdm(samples, desc="evaluating", unit="img", disable=not progress):
        image, true = load_sample(s, cfg.in_channels)
        x = preprocess([image], cfg.image_size, cfg.mean, cfg.std)
        mask = post.mask(post.probabilities(model, x, true.shape))[0]
        ev.update(mask, true.astype(bool), [s.name], [s.group])
    return ev



def _post_suffix(post: PostProcess) -> str:
    """``_tta-flips_largest_min50``: the report folder of a non-default post-processing."""
    return ((f"_tta-{post.tta}" if post.tta != "none" else "") + ("_largest" if post.largest else "")
            + (f"_min{post.min_pixels}" if post.min_pixels else "")
            + (f"_t{post.threshold:g}" if post.threshold != 0.5 else ""))


def _seen_in_training(samples: Sequence[Sample], stored: dict[str, Any] | None, source: str,
                      warn: bool = True) -> dict[str, str]:
    """``name -> "train" | "val"`` for the samples the model's own split trained or selected it
    on (matched by name), with a warning that says how many; empty if none or no split stored."""
    if not stored:
        return {}
    parts = {n: part for part in ("val", "train") for n in stored.get(part, ())}
    seen = {s.name: parts[s.name] for s in samples if s.name in parts}
    if seen and warn:
        n_train = sum(v == "train" for v in seen.values())
        log.warning("%d of the %d images scored were used to make this model (%s): %d in its "
                    "training split, %d in its validation split (model selection), matched by "
                    "name. The score over all of them is not a held-out score; the %d held-out "
                    "images are reported apart ('held out')", len(seen), len(samples), source,
                    n_train, len(seen) - n_train, len(samples) - len(seen))
    return seen


def _exported(path: str | Path | None) -> bool:
    return path is not None and Path(path).suffix in ENGINE_FILES


def evaluate_run(run_or_checkpoint: str | Path | None, data: str | Path | None = None,
                 split: str = "test", split_file: str | Path | None = None, grid: str = "resized",
                 out: str | Path | None = None, spacing: tuple[float, float] | None = None,
                 device: str = "auto", progress: bool = True, precision: str = "fp32",
                 weights: str | Path | None = None, backend: str | None = None,
                 post: PostProcess | None = None, overlap_warning: bool = True,
                 engine: str | None = None) -> tuple[dict[str, Any], Path]:
    """Score the ``split`` images of the checkpoint's dataset; write the reports.

    Args:
        run_or_checkpoint: run folder (uses ``checkpoint_best.pt``), checkpoint file, or an
            exported ``.onnx``/``.xml`` file (its engine); or None with ``weights``.
        data: dataset folder; default: the one the run was trained on.
        split: ``train``, ``val``, ``test`` or ``all``.
        split_file: split JSON; default: the split the model stores (the run's ``split.json``
            beside the checkpoint, the pretrained folder's or the exported file's).
        grid: ``resized`` (score at the training size, as the paper) or ``original``.
        out: report folder; default ``<run>/eval_<split>_<grid>`` (``_bf16`` appended for bf16).
        precision: ``fp32`` or ``bf16`` (autocast) inference.
        weights: a pretrained model (shipped name, folder or Hub id) instead of a run; its
            ``config.json`` carries the split it was trained with, used unless ``split_file``.
        backend: ``torch``, ``onnx``, ``openvino`` (``precision`` is then OpenVINO's hint) or
            ``auto`` (the fastest here, measured; see :func:`~lmnet.deploy.loading.choose_engine`);
            None: an exported file's own backend, else ``torch``. (``engine``: its old name.)
        post: test-time augmentation and mask clean-up
            (:class:`~lmnet.deploy.postprocess.PostProcess`); the report folder's name and
            ``evaluated_on.json`` say which.

    Images that the model's own split (the one it stores) puts in its training or validation
    part, scored with ``split="all"`` or another ``split_file``, are named in a warning and the
    held-out ones are reported apart (a group ``held out`` and one per part they came from);
    ``overlap_warning=False`` keeps the report and drops the warning (a caller that says it
    itself, as the demo).

    Returns:
        The aggregated metrics and the report folder.
    """
    run_or_checkpoint, weights = model_source(run_or_checkpoint, weights)
    engine = backend if backend is not None else engine
    if engine is None:
        engine = "auto" if _exported(run_or_checkpoint) else "torch"
    if device == "auto":  # a GPU for PyTorch where there is one; the other backends run on the CPU
        on_cpu = engine not in ("torch", "auto") or _exported(run_or_checkpoint)
        device = "cpu" if on_cpu else str(resolve_device("auto"))
    if device != "cpu" and engine not in ("torch", "auto"):
        raise ValueError(f"--backend {engine} runs on the CPU; --device {device} needs --backend torch")
    predictor = load_predictor(run_or_checkpoint, engine, weights, precision, batch_size=8)
    model, cfg, engine = predictor.model, predictor.cfg, predictor.engine
    if predictor.note and progress:
        log.info(predictor.note)
    if isinstance(model, nn.Module):
        model.to(torch.device(device))
    source = f"weights {weights}" if weights is not None else str(
        run_or_checkpoint if _exported(run_or_checkpoint) else resolve_checkpoint(run_or_checkpoint))
    data = data or cfg.data
    if not data or not Path(data).exists():
        raise FileNotFoundError(f"no dataset at {data!r}: pass --data PATH")
    fmt, samples, problems = discover(data, cfg.format if cfg.format else None)
    if problems:
        raise ValueError(f"{len(problems)} problems in {data}, e.g. {problems[0]} (see lmnet check-data)")
    if split == "all":
        chosen = samples
    else:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
        if split_file is None:
            stored = stored_split(run_or_checkpoint, weights)
            if stored is None:
                raise ValueError(f"{source} stores no split (no split.json beside a checkpoint): "
                                 "pass --split-file or --split all")
            names = set(check_split(stored, samples, f"the split stored with {source}")[split])
        else:
            names = set(load_split(split_file, samples)[split])
        chosen = [s for s in samples if s.name in names]
        if not chosen:
            raise ValueError(f"the {split} split of {split_file or source} is empty")
    seen = _seen_in_training(chosen, stored_split(run_or_checkpoint, weights), source,
                             overlap_warning) if split == "all" or split_file is not None else {}
    post = post or PostProcess()
    if post.sentence() and progress:
        log.info(post.sentence())
    with precision_context(precision if engine == "torch" else "fp32", torch.device(device).type):
        ev = evaluate_samples(model, chosen, cfg, grid, boundary=True, progress=progress,
                              spacing=spacing, post=post)
    result = ev.aggregate()
    if seen:
        for part in ("train", "val"):
            rows = [r for r in ev.rows if seen.get(r["name"]) == part]
            if rows:
                result["groups"][f"in the model's {part} split"] = summarize(rows)
        held = [r for r in ev.rows if r["name"] not in seen]
        if held:
            result["groups"]["held out"] = summarize(held)
        result["seen_in_training"] = {"train": sum(v == "train" for v in seen.values()),
                                      "val": sum(v == "val" for v in seen.values()),
                                      "held_out": len(held), "matched_by": "image name"}
    suffix = ("" if precision == "fp32" else f"_{precision}") + _post_suffix(post)
    if out:
        out_dir = Path(out)
    elif weights is not None:
        out_dir = Path(f"eval_{Path(str(weights)).name}_{split}_{grid}{suffix}")
    elif _exported(run_or_checkpoint):
        path = Path(run_or_checkpoint)
        out_dir = path.parent / f"eval_{path.stem}_{split}_{grid}{suffix}"
    else:
        out_dir = RunFolder(resolve_checkpoint(run_or_checkpoint).parent).eval_dir(split, grid, suffix)
    extra = {"checkpoint": source, "data": str(data), "format": fmt, "split": split,
             "grid": grid, "image_size": cfg.image_size, "model": cfg.model, "precision": precision,
             "engine": engine, **post.describe()}
    if _exported(run_or_checkpoint) and Path(run_or_checkpoint).suffix == ".xml":
        int8 = exported_metadata(run_or_checkpoint).get("lmnet_int8")
        if int8:  # an int8 IR: how it was quantised (the precision above is the compute hint)
            extra["int8"] = json.loads(int8)
    write_report(result, ev.rows, out_dir, extra)
    atomic_write_text(out_dir / "evaluated_on.json", json.dumps(extra, indent=2) + "\n")
    return result, out_dir
