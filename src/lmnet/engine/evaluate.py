"""``lmnet evaluate``: score a model on a list of samples (validation during training) or a trained
run on a split of its dataset, at the training size or at each image's own size."""
from __future__ import annotations

import json
import sys
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
from lmnet.deploy.checkpoint import model_source, resolve_checkpoint
from lmnet.deploy.engines import (
    ENGINE_FILES,
    precision_context,
    predict_probabilities,
    probabilities_to_mask,
)
from lmnet.deploy.export import exported_metadata, stored_split
from lmnet.deploy.loading import load_predictor
from lmnet.deploy.preprocess import preprocess
from lmnet.metrics import SegmentationEvaluator, write_report

__all__ = ["evaluate_samples", "evaluate_run", "GRIDS"]

#: ``resized``: score at image_size x image_size, as the paper; ``original``: at each image's size.
GRIDS = ("resized", "original")


@torch.inference_mode()
def evaluate_samples(model: nn.Module | Callable[[np.ndarray], np.ndarray], samples: Sequence[Sample], cfg: TrainConfig,
                     grid: str = "resized", boundary: bool = True, batch_size: int = 8,
                     dataset: SegmentationDataset | None = None, progress: bool = False,
                     spacing: tuple[float, float] | None = None) -> SegmentationEvaluator:
    """Predict every sample and score it; returns the filled evaluator (rows carry names, groups).

    ``model``: a PyTorch module or an engine's function (numpy batch -> numpy logits)."""
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
            mask = probabilities_to_mask(predict_probabilities(model, x))
            names = [ds.samples[i].name for i in idx.tolist()]
            groups = [ds.samples[i].group for i in idx.tolist()]
            ev.update(mask, y.numpy().astype(bool), names, groups)
        return ev
    for s in tqdm(samples, desc="evaluating", unit="img", disable=not progress):
        image, true = load_sample(s, cfg.in_channels)
        x = preprocess([image], cfg.image_size, cfg.mean, cfg.std)
        mask = probabilities_to_mask(predict_probabilities(model, x, true.shape))[0]
        ev.update(mask, true.astype(bool), [s.name], [s.group])
    return ev



def _exported(path: str | Path | None) -> bool:
    return path is not None and Path(path).suffix in ENGINE_FILES


def evaluate_run(run_or_checkpoint: str | Path | None, data: str | Path | None = None,
                 split: str = "test", split_file: str | Path | None = None, grid: str = "resized",
                 out: str | Path | None = None, spacing: tuple[float, float] | None = None,
                 device: str = "cpu", progress: bool = True, precision: str = "fp32",
                 weights: str | Path | None = None, engine: str | None = None
                 ) -> tuple[dict[str, Any], Path]:
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
        engine: ``torch``, ``onnx``, ``openvino`` (``precision`` is then OpenVINO's hint) or
            ``auto`` (the fastest here, measured; see :func:`~lmnet.deploy.loading.choose_engine`);
            None: an exported file's own engine, else ``torch``.

    Returns:
        The aggregated metrics and the report folder.
    """
    run_or_checkpoint, weights = model_source(run_or_checkpoint, weights)
    if engine is None:
        engine = "auto" if _exported(run_or_checkpoint) else "torch"
    if device != "cpu" and engine not in ("torch", "auto"):
        raise ValueError(f"--engine {engine} runs on the CPU; --device {device} needs --engine torch")
    predictor = load_predictor(run_or_checkpoint, engine, weights, precision, batch_size=8)
    model, cfg, engine = predictor.model, predictor.cfg, predictor.engine
    if predictor.note and progress:
        print(predictor.note, file=sys.stderr)
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
    with precision_context(precision if engine == "torch" else "fp32", torch.device(device).type):
        ev = evaluate_samples(model, chosen, cfg, grid, boundary=True, progress=progress,
                              spacing=spacing)
    result = ev.aggregate()
    suffix = "" if precision == "fp32" else f"_{precision}"
    if out:
        out_dir = Path(out)
    elif weights is not None:
        out_dir = Path(f"eval_{Path(str(weights)).name}_{split}_{grid}{suffix}")
    elif _exported(run_or_checkpoint):
        path = Path(run_or_checkpoint)
        out_dir = path.parent / f"eval_{path.stem}_{split}_{grid}{suffix}"
    else:
        out_dir = resolve_checkpoint(run_or_checkpoint).parent / f"eval_{split}_{grid}{suffix}"
    extra = {"checkpoint": source, "data": str(data), "format": fmt, "split": split,
             "grid": grid, "image_size": cfg.image_size, "model": cfg.model, "precision": precision,
             "engine": engine}
    if _exported(run_or_checkpoint) and Path(run_or_checkpoint).suffix == ".xml":
        int8 = exported_metadata(run_or_checkpoint).get("lmnet_int8")
        if int8:  # an int8 IR: how it was quantised (the precision above is the compute hint)
            extra["int8"] = json.loads(int8)
    write_report(result, ev.rows, out_dir, extra)
    atomic_write_text(out_dir / "evaluated_on.json", json.dumps(extra, indent=2) + "\n")
    return result, out_dir
