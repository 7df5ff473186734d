"""Inference engines: PyTorch (deployed, channels-last) or ONNX Runtime, at a chosen precision;
probabilities at any output size, and masks."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmnet.config import TrainConfig
from lmnet.deploy.checkpoint import model_from_checkpoint

__all__ = ["ENGINES", "PRECISIONS", "load_model", "load_predictor", "precision_context", "predict_probabilities",
           "probabilities_to_mask"]

#: Inference engines: PyTorch, or ONNX Runtime on the project's ONNX export.
ENGINES = ("torch", "onnx")

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


def load_model(checkpoint: str | Path | None = None, weights: str | Path | None = None
               ) -> tuple[nn.Module, TrainConfig]:
    """The deployed PyTorch model and its training config, from a checkpoint (or run folder) or
    from pretrained ``weights`` (a shipped name, a folder or a Hub id; see
    :func:`lmnet.from_pretrained`). Exactly one of the two."""
    if (checkpoint is None) == (weights is None):
        raise ValueError("give a checkpoint (or run folder) or --weights, not both or neither")
    if weights is not None:
        from lmnet.deploy.pretrained import from_pretrained, pretrained_train_config

        model = from_pretrained(weights)
        return model, pretrained_train_config(model)
    return model_from_checkpoint(checkpoint)


def load_predictor(checkpoint: str | Path | None = None, engine: str = "torch",
                   weights: str | Path | None = None) -> tuple[Any, TrainConfig]:
    """A deployed PyTorch model, or an ONNX Runtime function, and the training config.

    ``checkpoint``: a checkpoint, a run folder or (ONNX Runtime) an exported ``.onnx`` file;
    or ``weights``: a pretrained model (:func:`load_model`).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(ENGINES)}")
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.suffix == ".onnx":
        if engine != "onnx":
            raise ValueError(f"{path} is an ONNX file: use --engine onnx")
        if not path.is_file():
            raise FileNotFoundError(f"no such ONNX file: {path}")
        from lmnet.deploy.export import load_exported, onnx_config  # needs the export extra

        cfg = onnx_config(path)  # checks the file first: a clear error for files that are not ours
        return load_exported(path, "onnx"), cfg
    model, cfg = load_model(checkpoint, weights)
    if engine == "torch":
        return model, cfg
    # ONNX Runtime: export into a temporary folder; the session reads the whole file when it
    # starts, so nothing is left behind (lmnet export writes a file to keep)
    import tempfile

    from lmnet.deploy.export import export_model, load_exported

    with tempfile.TemporaryDirectory(prefix="lmnet-onnx-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_model(model, cfg, "onnx", onnx_path, check=False)
        return load_exported(onnx_path, "onnx"), cfg
