"""Loss of the paper's recipe: class-balanced cross-entropy plus an optional soft Dice term."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["class_balanced_weights", "SegmentationLoss"]


def class_balanced_weights(pixels_per_class: Iterable[float], beta: float = 0.9999) -> torch.Tensor:
    """Class weights from the effective number of samples (Cui et al., CVPR 2019).

    ``w_c = (1 - beta) / (1 - beta ** n_c)``, normalised to sum to the number of classes.
    ``n_c`` is the mean number of pixels of class ``c`` per training image (at the training size):
    with whole-set pixel totals every class would saturate at ``1 / (1 - beta)`` and get the same
    weight.
    """
    n = np.asarray(list(pixels_per_class), dtype=np.float64)
    if (n <= 0).any():
        raise ValueError(f"every class needs pixels in the training masks, got counts {n.tolist()}")
    effective = (1.0 - np.power(beta, n)) / (1.0 - beta)
    w = 1.0 / effective
    return torch.tensor(w / w.sum() * len(w), dtype=torch.float32)


class SegmentationLoss(nn.Module):
    """``weighted CE + dice_weight * (1 - soft Dice of the lesion)``.

    The CE is averaged over pixels (not over weights), and the Dice is computed per image and
    averaged over images, so the loss of a batch is the mean of its halves' losses: gradient
    accumulation and multi-process training give the gradient of the whole batch.

    Args:
        class_weights: ``(2,)`` weights of background and lesion.
        dice_weight: weight of the Dice term.
        n_classes: 2 (softmax logits) or 1 (one sigmoid logit map).
    """

    def __init__(self, class_weights: torch.Tensor, dice_weight: float = 1.0, n_classes: int = 2) -> None:
        super().__init__()
        self.register_buffer("class_weights", class_weights.float())
        self.dice_weight = dice_weight
        self.n_classes = n_classes

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits (B, n_classes, H, W)``, ``target (B, H, W)`` int in {0, 1}; returns a scalar."""
        logits = logits.float()
        w = self.class_weights[target]
        if self.n_classes == 1:
            nll = F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none")
            prob = torch.sigmoid(logits[:, 0])
        else:
            nll = F.cross_entropy(logits, target, reduction="none")
            prob = torch.softmax(logits, dim=1)[:, 1]
        loss = (w * nll).mean()
        if self.dice_weight:
            t = target.float()
            inter = (prob * t).sum(dim=(1, 2))
            dice = (2 * inter + 1.0) / (prob.sum(dim=(1, 2)) + t.sum(dim=(1, 2)) + 1.0)
            loss = loss + self.dice_weight * (1.0 - dice).mean()
        return loss
