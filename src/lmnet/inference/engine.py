"""Inference on images of any size: resize to the model's size, predict, resize back."""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PRECISIONS", "precision_context", "preprocess", "predict_probabilities",
           "probabilities_to_mask"]

#: Inference precisions: fp32, bf16 autocast (AVX-512 BF16 / AMX CPUs, recent GPUs), fp16
#: autocast (GPUs only).
PRECISIONS = ("fp32", "bf16", "fp16")


def precision_context(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """Autocast for ``bf16`` and ``fp16``, nothing for ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("fp16 inference needs a CUDA GPU; on a CPU use bf16")
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type, dtype=dtype)
    return contextlib.nullcontext()


def preprocess(images: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float]
               ) -> torch.Tensor:
    """``uint8 (H, W, C)`` images -> normalised ``float (N, C, size, size)`` (bilinear resize)."""
    import cv2

    batch = []
    for img in images:
        resized = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
        if resized.ndim == 2:
            resized = resized[..., None]
        batch.append(resized.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(batch).astype(np.float32) / 255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


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
