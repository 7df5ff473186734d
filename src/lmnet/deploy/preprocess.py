"""Images as a model takes them: the same resize and normalisation as training and evaluation."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from lmnet.data.transforms import normalize, resize_image

__all__ = ["preprocess"]


def preprocess(images: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float]
               ) -> torch.Tensor:
    """``uint8 (H, W, C)`` images -> normalised ``float32 (N, C, size, size)``.

    Exactly what :class:`~lmnet.data.dataset.SegmentationDataset` gives for an evaluation item
    (:func:`~lmnet.data.transforms.resize_image`, then :func:`~lmnet.data.transforms.normalize`).
    """
    return torch.from_numpy(np.stack([normalize(resize_image(img, size), mean, std) for img in images]))
