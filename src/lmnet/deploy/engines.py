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

from lmnet._optional import require
from lmnet.config import TrainConfig
from lmnet.deploy.checkpoint import model_from_checkpoint

__all__ = ["ENGINES", "ENGINE_FILES", "PRECISIONS", "convert_to_openvino", "load_model",
           "load_predictor", "openvino_runner", "precision_context", "predict_probabilities",
           "probabilities_to_mask"]

#: Inference engines: PyTorch, ONNX Runtime on the project's ONNX export, or OpenVINO (converted
#: straight from PyTorch, or an IR from ``lmnet export --format openvino``).
ENGINES = ("torch", "onnx", "openvino")
#: Exported files each engine reads.
ENGINE_FILES = {".onnx": "onnx", ".xml": "openvino"}

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


def openvino_runner(model: nn.Module | str | Path, in_channels: int = 3, size: int = 256,
                    precision: str = "fp32", threads: int | None = None
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``numpy (N, C, H, W) float32 -> numpy logits`` running OpenVINO on the CPU.

    ``model``: a deployed PyTorch model (converted directly, batch and size dynamic) or the path of
    an OpenVINO IR (``.xml``). ``precision``: ``fp32``, or ``bf16`` as OpenVINO's inference
    precision hint (used where the CPU has bf16 instructions, else OpenVINO computes in fp32).
    ``threads``: default PyTorch's thread count (``--threads``).
    """
    ov = require("openvino", "openvino")
    hints = {"fp32": "f32", "bf16": "bf16"}
    if precision not in hints:
        raise ValueError(f"OpenVINO runs fp32 or bf16 on a CPU, got {precision!r}")
    core = ov.Core()
    if isinstance(model, (str, Path)):
        ov_model = core.read_model(str(model))
    else:
        ov_model = convert_to_openvino(model, in_channels, size)
    compiled = core.compile_model(ov_model, "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hints[precision],
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())})
    return lambda x: compiled(np.ascontiguousarray(x, dtype=np.float32))[0]


def convert_to_openvino(model: nn.Module, in_channels: int = 3, size: int = 256) -> Any:
    """An ``openvino.Model`` of a deployed PyTorch model, batch and spatial size dynamic."""
    import warnings

    ov = require("openvino", "openvino")
    model.eval()
    example = torch.randn(1, in_channels, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
        return ov.convert_model(model, example_input=example,
                                input=[ov.PartialShape([-1, in_channels, -1, -1])])


def load_predictor(checkpoint: str | Path | None = None, engine: str = "torch",
                   weights: str | Path | None = None, precision: str = "fp32"
                   ) -> tuple[Any, TrainConfig]:
    """A deployed PyTorch model, or an ONNX Runtime or OpenVINO function, and the training config.

    ``checkpoint``: a checkpoint, a run folder, or an exported ``.onnx`` (ONNX Runtime) or ``.xml``
    (OpenVINO) file; or ``weights``: a pretrained model (:func:`load_model`). ``precision`` is
    OpenVINO's inference precision hint (PyTorch's autocast is applied by the caller).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(ENGINES)}")
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.suffix in ENGINE_FILES:
        wanted = ENGINE_FILES[path.suffix]
        if engine != wanted:
            raise ValueError(f"{path} is an exported {wanted} file: use --engine {wanted}")
        if not path.is_file():
            raise FileNotFoundError(f"no such {wanted} file: {path}")
        from lmnet.deploy.export import exported_config, load_exported

        cfg = exported_config(path)  # checks the file first: a clear error for files not ours
        if engine == "openvino":
            return openvino_runner(path, precision=precision), cfg
        return load_exported(path, "onnx"), cfg
    model, cfg = load_model(checkpoint, weights)
    if engine == "torch":
        return model, cfg
    if engine == "openvino":
        return openvino_runner(model, cfg.in_channels, cfg.image_size, precision), cfg
    # ONNX Runtime: export into a temporary folder; the session reads the whole file when it
    # starts, so nothing is left behind (lmnet export writes a file to keep)
    import tempfile

    from lmnet.deploy.export import export_model, load_exported

    with tempfile.TemporaryDirectory(prefix="lmnet-onnx-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_model(model, cfg, "onnx", onnx_path, check=False)
        return load_exported(onnx_path, "onnx"), cfg
