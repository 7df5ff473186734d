"""Scoring a model on a list of samples, at the training size or at each image's own size."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lmnet.data.dataset import SegmentationDataset, load_sample
from lmnet.data.layouts import Sample
from lmnet.inference.engine import predict_probabilities, preprocess, probabilities_to_mask
from lmnet.metrics import SegmentationEvaluator
from lmnet.train.config import TrainConfig

__all__ = ["evaluate_samples", "GRIDS"]

#: ``resized``: score at image_size x image_size, as the paper; ``original``: at each image's size.
GRIDS = ("resized", "original")


@torch.inference_mode()
def evaluate_samples(model: nn.Module, samples: Sequence[Sample], cfg: TrainConfig,
                     grid: str = "resized", boundary: bool = True, batch_size: int = 8,
                     dataset: SegmentationDataset | None = None, progress: bool = False,
                     spacing: tuple[float, float] | None = None) -> SegmentationEvaluator:
    """Predict every sample and score it; returns the filled evaluator (rows carry names, groups)."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
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
