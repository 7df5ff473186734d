"""Inference backends: a deployed model on PyTorch (channels-last), ONNX Runtime or OpenVINO, at a
chosen precision, as a function from a numpy batch to numpy logits (PyTorch: the module itself)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lmnet._files import cache_dir
from lmnet._optional import require
from lmnet.config import TrainConfig
from lmnet.deploy import openvino_ops
from lmnet.deploy.convert import cached_onnx_export, cached_openvino_model
from lmnet.runtime import steady_signal_stack

__all__ = ["BACKENDS", "BACKEND_FILES", "ENGINES", "ENGINE_FILES", "PRECISIONS", "backend_available",
           "engine_available", "load_exported", "make_runner", "openvino_runner", "precision_context"]

#: Inference backends: PyTorch, ONNX Runtime on the project's ONNX export, or OpenVINO (converted
#: straight from PyTorch, or an IR from ``lmnet export --format openvino``).
BACKENDS = ("torch", "onnx", "openvino")
#: Exported files each backend reads.
BACKEND_FILES = {".onnx": "onnx", ".xml": "openvino"}
#: The names from before the runtimes were called backends (``--engine``).
ENGINES, ENGINE_FILES = BACKENDS, BACKEND_FILES

#: Inference precisions: fp32, bf16 autocast (AVX-512 BF16 / AMX CPUs, recent GPUs), fp16
#: autocast (GPUs only).
PRECISIONS = ("fp32", "bf16", "fp16")


def _compile(core: Any, model: Any, device: str, config: dict) -> Any:
    """``core.compile_model``, with a signal stack that outlives it
    (:func:`lmnet.runtime.steady_signal_stack`)."""
    steady_signal_stack()
    try:
        return core.compile_model(model, device, config)
    finally:
        steady_signal_stack()


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


def _ir_image_size(ov_model: Any) -> int | None:
    """The training image size stored by ``lmnet export`` in an IR's runtime info, if any."""
    import json

    try:
        return int(json.loads(ov_model.get_rt_info(["lmnet_config"]).astype(str))["image_size"])
    except Exception:  # noqa: BLE001 - not written by lmnet: no size known
        return None


def openvino_runner(model: nn.Module | str | Path, in_channels: int = 3, size: int | None = 256,
                    precision: str = "fp32", threads: int | None = None, fixed_size: bool = True,
                    fused_attention: bool | None = None) -> Callable[[np.ndarray], np.ndarray]:
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
    ``fused_attention``: convert each neighborhood attention to one node run by lmnet's native
    kernel (:mod:`lmnet.deploy.openvino_ops`); default: where that kernel loads.
    """
    ov = require("openvino", "openvino")
    hints = {"fp32": "f32", "bf16": "bf16"}
    if precision not in hints:
        raise ValueError(f"OpenVINO runs fp32 or bf16 on a CPU, got {precision!r}")
    core = ov.Core()
    openvino_ops.register(core)
    if isinstance(model, (str, Path)):
        ov_model = core.read_model(str(model))
        size = _ir_image_size(ov_model) or size
    else:
        if fused_attention is None:
            fused_attention = openvino_ops.attention_op_available()
        ov_model = cached_openvino_model(model, in_channels, size or 256, fused_attention)
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
        compiled = _compile(core, ov_model, "CPU", config)
        return lambda x: compiled(np.ascontiguousarray(x, dtype=np.float32))[0]

    def for_batch(n: int) -> Any:
        fixed = ov_model.clone()
        fixed.reshape({fixed.input(0): ov.PartialShape([n, shape[1], size, size])})
        return _compile(core, fixed, "CPU", config)

    compiled, other = {1: for_batch(1)}, []

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[2:] == (size, size):
            if x.shape[0] not in compiled:
                compiled[x.shape[0]] = for_batch(x.shape[0])
            return compiled[x.shape[0]](x)[0]
        if not other:
            other.append(_compile(core, ov_model, "CPU", config))
        return other[0](x)[0]

    return run


def engine_available(engine: str) -> bool:
    """Whether ``engine``'s packages are installed (PyTorch always is)."""
    import importlib.util

    needs = {"torch": (), "onnx": ("onnx", "onnxscript", "onnxruntime"), "openvino": ("openvino",)}
    if engine not in needs:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(ENGINES)}")
    return all(importlib.util.find_spec(m) is not None for m in needs[engine])


#: The function's name from before the runtimes were called backends.
backend_available = engine_available


def load_exported(path: str | Path, fmt: str, threads: int | None = None
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``numpy (N, C, H, W) float32 -> numpy logits`` running an exported model on
    ``threads`` threads (default: PyTorch's thread count, ``--threads``)."""
    if fmt == "openvino":
        return openvino_runner(path, threads=threads)
    if fmt == "onnx":
        ort = require("onnxruntime", "export")

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    module = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run


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
        raise ValueError(f"precision {precision!r} is available with --backend torch or openvino")
    path = cached_onnx_export(model, cfg)
    run = load_exported(path, "onnx", threads)
    if not path.is_relative_to(cache_dir()):  # a scratch copy: the session has read it
        import shutil

        shutil.rmtree(path.parent, ignore_errors=True)
    return run
