"""The one preprocessing path (resize, normalise) and the paper's augmentation (albumentations).

Training, validation, evaluation and prediction all resize with :func:`resize_image` /
:func:`resize_mask` and normalise with :func:`normalize`; :func:`lmnet.deploy.preprocess` is the
same path for batches of images. The default mean and std are stated once, in ``lmnet._defaults``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from lmnet._defaults import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:  # albumentations is imported only by the functions that need it
    import albumentations as A

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "resize_image", "resize_mask", "normalize",
           "train_transform"]



def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """``uint8 (H, W, C)`` -> ``(size, size, C)``, bilinear (OpenCV's ``INTER_LINEAR``)."""
    import cv2

    out = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    return out[..., None] if out.ndim == 2 else out


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """``(H, W)`` mask -> ``(size, size)``, nearest neighbour (labels stay labels)."""
    import cv2

    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``uint8 (H, W, C)`` -> ``float32 (C, H, W)``: ``(image / 255 - mean) / std`` per channel."""
    m = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, np.float32).reshape(-1, 1, 1)
    if m.shape[0] != image.shape[2] or s.shape[0] != image.shape[2]:
        raise ValueError(f"mean and std need {image.shape[2]} values each, got {m.shape[0]} and "
                         f"{s.shape[0]}")
    x = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
    return (x - m) / s


def train_transform(size: int, seed: int | None = None, channels: int = 3) -> "A.Compose":
    """Resize to ``size``, then the paper's augmentation.

    Translation up to 10 % and scale 0.9-1.1 (each p = 0.5), horizontal and vertical flips
    (p = 0.5), rotation within ±30° (p = 0.5), Gaussian blur (p = 0.2), colour jitter
    0.2 / 0.2 / 0.2 / 0.2 (p = 0.2; brightness and contrast only for images that are not RGB).
    Areas moved in from outside the image are black / background.
    """
    import albumentations as A
    import cv2

    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    return A.Compose([
        A.Resize(size, size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST),
        A.Affine(translate_percent=(-0.1, 0.1), p=0.5, **border),
        A.Affine(scale=(0.9, 1.1), p=0.5, **border),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Rotate(limit=30, p=0.5, **border),
        A.GaussianBlur(p=0.2),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.2, p=0.2)
        if channels == 3 else A.RandomBrightnessContrast(0.2, 0.2, p=0.2),
    ], seed=seed)
