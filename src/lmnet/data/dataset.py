"""PyTorch dataset over :class:`~lmnet.data.layouts.Sample` lists, with an in-memory cache."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from lmnet.data.io import read_image, read_mask, warn_label_maps
from lmnet.data.layouts import Sample
from lmnet.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    resize_image,
    resize_mask,
    train_transform,
)

__all__ = ["load_sample", "SegmentationDataset"]

log = logging.getLogger(__name__)



def load_sample(sample: Sample, channels: int = 3, label_maps: list | None = None,
                findings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image ``uint8 (H, W, channels)`` and mask ``uint8 (H, W)`` in {0, 1} (union of its masks).
    ``label_maps`` collects the mask files that look like label maps, ``findings`` what looks
    wrong about each mask (see :func:`~lmnet.data.io.read_mask`)."""
    image = read_image(sample.image, channels)
    mask = np.zeros(image.shape[:2], dtype=bool)
    for path in sample.masks:
        m = read_mask(path, label_maps, findings)
        if m.shape != mask.shape:
            raise ValueError(f"{path} is {m.shape[1]}x{m.shape[0]} but its image {sample.image} is "
                             f"{mask.shape[1]}x{mask.shape[0]} (width x height)")
        mask |= m
    return image, mask.astype(np.uint8)


class SegmentationDataset(Dataset):
    """Items ``(image float (C, S, S) normalised, mask int64 (S, S), index)``.

    Args:
        samples: what to load.
        size: side ``S`` the images are resized to.
        train: apply the paper's augmentation.
        channels: image channels.
        mean, std: per-channel normalisation of ``image / 255``.
        seed: augmentation seed; sample ``i`` in epoch ``e`` always gets the same augmentation,
            whichever process or worker loads it (so multi-process runs match single-process ones).
        cache: decode and resize every file once, up front, and keep the ``uint8`` arrays in memory.
    """

    def __init__(self, samples: Sequence[Sample], size: int, train: bool = False, channels: int = 3,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 seed: int = 0, cache: bool = True, progress: bool = False) -> None:
        self.samples = list(samples)
        self.size, self.train, self.channels, self.seed = size, train, channels, seed
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values each, got {len(mean)} and {len(std)}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.epoch = 0
        self.output_size = size
        self.augment = train_transform(size, seed, channels) if train else None
        self.cache: list[tuple[np.ndarray, np.ndarray]] | None = None
        if cache:
            label_maps: list = []
            self.cache = [self._load_resized(s, label_maps) for s in
                          tqdm(self.samples, desc="loading", unit="img", disable=not progress)]
            warn_label_maps(label_maps, sum(len(s.masks) for s in self.samples))

    def _load_resized(self, sample: Sample, label_maps: list | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        image, mask = load_sample(sample, self.channels, label_maps)
        return resize_image(image, self.size), resize_mask(mask, self.size)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        self.epoch = epoch

    def set_output_size(self, size: int) -> None:
        """Augment to ``size`` x ``size`` from now on (progressive resizing; the cache stays)."""
        if not self.train:
            raise ValueError("only a training dataset changes its output size")
        if size != self.output_size:
            self.output_size = size
            self.augment = train_transform(size, self.seed, self.channels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, mask = self.cache[index] if self.cache is not None else self._load_resized(
            self.samples[index])
        if self.augment is not None:
            self.augment.set_random_seed(int(np.random.SeedSequence(
                [self.seed, self.epoch, index]).generate_state(1)[0]))
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        x = normalize(image, self.mean, self.std)
        return torch.from_numpy(x), torch.from_numpy(mask.astype(np.int64)), index
