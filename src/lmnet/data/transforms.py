"""The paper's augmentation (albumentations) and the evaluation transform."""
from __future__ import annotations

import albumentations as A
import cv2

__all__ = ["train_transform", "eval_transform"]


def train_transform(size: int, seed: int | None = None, channels: int = 3) -> A.Compose:
    """Resize to ``size``, then the paper's augmentation.

    Translation up to 10 % and scale 0.9-1.1 (each p = 0.5), horizontal and vertical flips
    (p = 0.5), rotation within ±30° (p = 0.5), Gaussian blur (p = 0.2), colour jitter
    0.2 / 0.2 / 0.2 / 0.2 (p = 0.2; brightness and contrast only for images that are not RGB).
    Areas moved in from outside the image are black / background.
    """
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    return A.Compose([
        A.Resize(size, size),
        A.Affine(translate_percent=(-0.1, 0.1), p=0.5, **border),
        A.Affine(scale=(0.9, 1.1), p=0.5, **border),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Rotate(limit=30, p=0.5, **border),
        A.GaussianBlur(p=0.2),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.2, p=0.2)
        if channels == 3 else A.RandomBrightnessContrast(0.2, 0.2, p=0.2),
    ], seed=seed)


def eval_transform(size: int) -> A.Compose:
    """Resize to ``size`` x ``size`` only."""
    return A.Compose([A.Resize(size, size)])
