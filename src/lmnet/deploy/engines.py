"""Inference engines: a deployed model on PyTorch (channels-last), ONNX Runtime or OpenVINO, at a
chosen precision; probabilities at any output size, and masks."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmnet._files import atomic_path
from lmnet._optional import require
from lmnet.config import TrainConfig

__all__ = ["ENGINES", "ENGINE_FILES", "PRECISIONS", "cache_dir", "cached_onnx_export",
           "cached_openvino_model",
           "convert_to_openvino", "engine_available",
           "make_runner", "openvino_runner", "precision_context", "predict_probabilities",
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


def cache_dir() -> Path:
    """lmnet's cache folder (measured engine choices, converted OpenVINO models):
    ``$LMNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/lmnet``, else ``~/.cache/lmnet``. Safe to delete."""
    import os

    root = os.environ.get("LMNET_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmnet"


def _model_digest(model: nn.Module, in_channels: int, tool: str) -> str:
    """A digest of what a conversion depends on: the weights, their names and shapes, the model's
    class, the input channels, and the versions of lmnet, PyTorch and the converting ``tool``."""
    import hashlib
    from importlib.metadata import version

    from lmnet._version import __version__

    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}|{in_channels}|"
                       f"{__version__}|{torch.__version__}|{tool} {version(tool)}".encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def cached_openvino_model(model: nn.Module, in_channels: int = 3, size: int = 256) -> Any:
    """:func:`convert_to_openvino`, kept in ``cache_dir()/openvino`` so that converting (seconds)
    happens once per model: an IR named by a digest of the weights (:func:`_model_digest`), read
    back on later calls. A cache that cannot be written only costs the conversion."""
    ov = require("openvino", "openvino")
    folder = cache_dir() / "openvino"
    xml = folder / f"{_model_digest(model, in_channels, 'openvino')}.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        try:
            return ov.Core().read_model(str(xml))
        except Exception:  # noqa: BLE001 - a damaged cache entry: convert again
            pass
    ov_model = convert_to_openvino(model, in_channels, size)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(xml, suffix_keep=True) as tmp:  # the .xml last: never one without its .bin
            ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
            tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    except OSError:
        pass
    return ov_model


def _ir_image_size(ov_model: Any) -> int | None:
    """The training image size stored by ``lmnet export`` in an IR's runtime info, if any."""
    import json

    try:
        return int(json.loads(ov_model.get_rt_info(["lmnet_config"]).astype(str))["image_size"])
    except Exception:  # noqa: BLE001 - not written by lmnet: no size known
        return None


def openvino_runner(model: nn.Module | str | Path, in_channels: int = 3, size: int | None = 256,
                    precision: str = "fp32", threads: int | None = None, fixed_size: bool = True
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``numpy (N, C, H, W) float32 -> numpy logits`` running OpenVINO on the CPU.

    ``model``: a deployed PyTorch model (converted with batch and size dynamic, the conversion
    cached: :func:`cached_openvino_model`) or the path of an OpenVINO IR (``.xml``; the size
    ``lmnet export`` stored in it, else ``size``). ``fixed_size``: compile for inputs of
    ``size x size`` (the size the preprocessing always feeds; OpenVINO then plans every layer for
    it: 1.18x at batch 1 in ``docs/performance.md``) and for each batch size on its first use (a
    fixed batch too: int8 1.13x at batch 1); another size compiles the dynamic model on first use.
    ``precision``: ``fp32``, or ``bf16`` as OpenVINO's inference precision hint (used where the
    CPU has bf16 instructions, else OpenVINO computes in fp32). ``threads``: default PyTorch's
    thread count (``--threads``). Compiled kernels are cached by OpenVINO in ``cache_dir()``.
    """
    ov = require("openvino", "openvino")
    hints = {"fp32": "f32", "bf16": "bf16"}
    if precision not in hints:
        raise ValueError(f"OpenVINO runs fp32 or bf16 on a CPU, got {precision!r}")
    core = ov.Core()
    if isinstance(model, (str, Path)):
        ov_model = core.read_model(str(model))
        size = _ir_image_size(ov_model) or size
    else:
        ov_model = cached_openvino_model(model, in_channels, size or 256)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hints[precision],
              "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
    try:
        (cache_dir() / "openvino" / "compiled").mkdir(parents=True, exist_ok=True)
        config["CACHE_DIR"] = str(cache_dir() / "openvino" / "compiled")
    except OSError:
        pass
    shape = ov_model.input(0).get_partial_shape()
    if not (fixed_size and size and shape.rank.is_static and shape.rank.get_length() == 4
            and shape[2].is_dynamic and shape[3].is_dynamic):
        compiled = core.compile_model(ov_model, "CPU", config)
        return lambda x: compiled(np.ascontiguousarray(x, dtype=np.float32))[0]

    def for_batch(n: int) -> Any:
        fixed = ov_model.clone()
        fixed.reshape({fixed.input(0): ov.PartialShape([n, shape[1], size, size])})
        return core.compile_model(fixed, "CPU", config)

    compiled, other = {1: for_batch(1)}, []

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[2:] == (size, size):
            if x.shape[0] not in compiled:
                compiled[x.shape[0]] = for_batch(x.shape[0])
            return compiled[x.shape[0]](x)[0]
        if not other:
            other.append(core.compile_model(ov_model, "CPU", config))
        return other[0](x)[0]

    return run


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


def engine_available(engine: str) -> bool:
    """Whether ``engine``'s packages are installed (PyTorch always is)."""
    import importlib.util

    needs = {"torch": (), "onnx": ("onnx", "onnxscript", "onnxruntime"), "openvino": ("openvino",)}
    if engine not in needs:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(ENGINES)}")
    return all(importlib.util.find_spec(m) is not None for m in needs[engine])


def make_runner(model: nn.Module, cfg: TrainConfig, engine: str, precision: str = "fp32",
                threads: int | None = None) -> Any:
    """A deployed PyTorch ``model`` on ``engine``: the model itself (``torch``; the caller applies
    autocast, see :func:`precision_context`), or a function from a numpy batch to numpy logits
    (``onnx``: exported to a temporary file, nothing left behind; ``openvino``: converted in
    memory, ``precision`` as its hint)."""
    if engine == "torch":
        return model
    if engine == "openvino":
        return openvino_runner(model, cfg.in_channels, cfg.image_size, precision, threads)
    if engine != "onnx":
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(ENGINES)}")
    if precision != "fp32":
        raise ValueError(f"precision {precision!r} is available with --engine torch or openvino")
    from lmnet.deploy.export import load_exported

    path = cached_onnx_export(model, cfg)
    run = load_exported(path, "onnx", threads)
    if not path.is_relative_to(cache_dir()):  # a scratch copy: the session has read it
        import shutil

        shutil.rmtree(path.parent, ignore_errors=True)
    return run


def cached_onnx_export(model: nn.Module, cfg: TrainConfig) -> Path:
    """The ONNX export of a deployed model, kept in ``cache_dir()/onnx`` under a digest of its
    weights (exporting takes seconds); written to a temporary folder if the cache is not
    writable (ONNX Runtime reads the whole file when its session starts)."""
    import tempfile

    from lmnet.deploy.export import export_model

    folder = cache_dir() / "onnx"
    path = folder / f"{_model_digest(model, cfg.in_channels, 'onnxruntime')}_{cfg.image_size}.onnx"
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        export_model(model, cfg, "onnx", path, check=False)  # written whole or not at all
        return path
    except OSError:
        scratch = Path(tempfile.mkdtemp(prefix="lmnet-onnx-")) / "model.onnx"
        export_model(model, cfg, "onnx", scratch, check=False)
        return scratch
