"""What happens between a model's logits and the mask a user sees: lesion probabilities (softmax
or sigmoid, resized), test-time augmentation (flipped
copies of the input, their probabilities flipped back and averaged) and clean-up of the binary mask
(keep the largest connected lesion, drop lesions under a number of pixels).

Lesions are 8-connected components of the mask (``scipy.ndimage.label``): pixels touching by an
edge or a corner belong to one lesion. Sizes are counted in pixels of the mask as it is written:
at each image's own size in ``lmnet predict``, at the scoring grid in ``lmnet evaluate``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

__all__ = ["TTA_CHOICES", "TTA_HELP", "TTA_TRANSFORMS", "PostProcess", "predict_probabilities",
           "probabilities_to_mask", "tta_probabilities", "clean_mask", "count_lesions"]

#: The input dimensions each transform flips (of ``(N, C, H, W)``); every transform is its own inverse.
_FLIPS = {"identity": (), "hflip": (3,), "vflip": (2,), "hvflip": (2, 3)}
#: ``--tta`` choices and the transforms each averages.
TTA_TRANSFORMS = {"none": ("identity",), "hflip": ("identity", "hflip"),
                  "flips": ("identity", "hflip", "vflip", "hvflip")}
TTA_CHOICES = tuple(TTA_TRANSFORMS)
#: What ``--tta`` does, as the commands that take it say.
TTA_HELP = ("test-time augmentation: hflip (2 passes) or flips (4: identity, horizontal, vertical, "
            "both), lesion probabilities averaged; none: one pass")
_EIGHT = np.ones((3, 3), bool)


@torch.inference_mode()
def predict_probabilities(model: nn.Module | Callable[[np.ndarray], np.ndarray], x: torch.Tensor,
                          out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Lesion probability ``(N, H, W)`` from ``x (N, C, S, S)``, optionally resized to ``out_size``.

    ``model`` is a PyTorch module or a function from a numpy batch to numpy logits (an exported
    model). Softmax over 2+ classes (class 1 = lesion) or sigmoid of a single map; resizing is
    bilinear on the probabilities.
    """
    if isinstance(model, nn.Module):
        param = next(model.parameters())
        x = x.to(param.device)
        if param.dim() == 4 and param.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x).float()
    else:
        logits = torch.from_numpy(np.asarray(model(x.numpy()))).float()
    prob = torch.sigmoid(logits[:, :1]) if logits.shape[1] == 1 else torch.softmax(logits, 1)[:, 1:2]
    if out_size is not None and tuple(prob.shape[-2:]) != tuple(out_size):
        prob = F.interpolate(prob, size=out_size, mode="bilinear", align_corners=False)
    return prob[:, 0].cpu()


def probabilities_to_mask(prob: torch.Tensor, threshold: float = 0.5) -> np.ndarray:
    """Binary lesion mask ``bool``; for softmax over two classes 0.5 equals the argmax."""
    return (prob > threshold).numpy()


@dataclass(frozen=True)
class PostProcess:
    """How probabilities become a mask: ``tta`` (a key of :data:`TTA_TRANSFORMS`), ``threshold``
    on the lesion probability, then ``largest`` (keep only the largest lesion) and ``min_pixels``
    (drop lesions smaller than this; 0: keep all)."""

    tta: str = "none"
    threshold: float = 0.5
    largest: bool = False
    min_pixels: int = 0

    def __post_init__(self) -> None:
        if self.tta not in TTA_TRANSFORMS:
            raise ValueError(f"--tta must be one of {', '.join(TTA_CHOICES)}, got {self.tta!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.min_pixels < 0:
            raise ValueError(f"the smallest lesion kept must be 0 pixels or more, got {self.min_pixels}")

    @property
    def transforms(self) -> tuple[str, ...]:
        return TTA_TRANSFORMS[self.tta]

    @property
    def cleans(self) -> bool:
        return self.largest or self.min_pixels > 0

    def describe(self) -> dict[str, Any]:
        """The settings as they go into reports: the transforms averaged, threshold, clean-up."""
        return {"tta": list(self.transforms), "threshold": self.threshold,
                "keep_largest": self.largest, "min_lesion_pixels": self.min_pixels}

    def sentence(self) -> str:
        """One line for the terminal, e.g. ``test-time augmentation: identity, hflip (...)``."""
        parts = []
        if self.tta != "none":
            parts.append(f"test-time augmentation: {', '.join(self.transforms)} "
                         "(lesion probabilities averaged)")
        if self.largest:
            parts.append("only the largest lesion kept")
        if self.min_pixels:
            parts.append(f"lesions under {self.min_pixels} pixels dropped")
        return "; ".join(parts)

    def probabilities(self, model: Any, x: torch.Tensor,
                      out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Lesion probabilities ``(N, H, W)`` of ``x`` under this test-time augmentation."""
        return tta_probabilities(model, x, self.transforms, out_size)

    def mask(self, prob: torch.Tensor | np.ndarray) -> np.ndarray:
        """Boolean mask(s) of probabilities ``(H, W)`` or ``(N, H, W)``, cleaned up."""
        prob = prob.numpy() if isinstance(prob, torch.Tensor) else np.asarray(prob)
        return clean_mask(prob > self.threshold, self.largest, self.min_pixels)


def tta_probabilities(model: Any, x: torch.Tensor, transforms: tuple[str, ...] = ("identity",),
                      out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The mean of :func:`predict_probabilities` over ``transforms`` (names
    of flips, see :data:`TTA_TRANSFORMS`): each flipped input's probabilities flipped back, then
    resized to ``out_size`` if given."""
    total = None
    for name in transforms:
        if name not in _FLIPS:
            raise ValueError(f"unknown test-time transform {name!r}; known: {', '.join(_FLIPS)}")
        dims = _FLIPS[name]
        xi = x.flip(dims) if dims else x
        prob = predict_probabilities(model, xi)  # (N, S, S)
        if dims:
            prob = prob.flip(tuple(d - 1 for d in dims))  # (N, C, H, W) dims -> (N, H, W) dims
        total = prob if total is None else total + prob
    prob = total / len(transforms)
    if out_size is not None and tuple(prob.shape[-2:]) != tuple(out_size):
        prob = torch.nn.functional.interpolate(prob[:, None], size=out_size, mode="bilinear",
                                               align_corners=False)[:, 0]
    return prob


def count_lesions(mask: np.ndarray) -> int:
    """Number of 8-connected lesions of a 2-D boolean mask."""
    return int(ndimage.label(mask, structure=_EIGHT)[1])


def clean_mask(mask: np.ndarray, largest: bool = False, min_pixels: int = 0) -> np.ndarray:
    """``mask`` (``(H, W)`` or ``(N, H, W)``, bool) with lesions under ``min_pixels`` removed and,
    with ``largest``, only the largest lesion kept (the first of equal ones, in scan order)."""
    mask = np.asarray(mask, bool)
    if not largest and min_pixels <= 0:
        return mask
    if mask.ndim == 3:
        return np.stack([clean_mask(m, largest, min_pixels) for m in mask])
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    keep = sizes >= max(min_pixels, 1)
    if largest:
        best = int(np.argmax(sizes))
        keep = np.zeros_like(keep)
        keep[best] = sizes[best] >= max(min_pixels, 1)
    return keep[labels]
