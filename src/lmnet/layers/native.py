"""lmnet's native CPU kernels: C++ sources in ``layers/_native/``, compiled once per machine with
PyTorch's extension tools (``torch.utils.cpp_extension``, a C++ compiler needed) and registered as
``torch.ops.lmnet_native.*`` through ``TORCH_LIBRARY``.

The build is cached (``$LMNET_NATIVE_CACHE``, else ``$LMNET_CACHE_DIR/native``, else
``~/.cache/lmnet/native``) under a name that holds a digest of the sources, the compiler flags,
the processor and PyTorch's version, so a build made on another machine is never loaded here. The
first use on a machine (training, or inference: the attention kernel) compiles, about 26 s for the
five sources on two cores of a Xeon (:func:`native_status` reports it; 74 s while they included
``torch/extension.h``, PyTorch's whole C++ API and pybind11, about 25 s of parsing per source
where ATen's headers and the operator registry, all they use, take about 7 s); later processes
load the cached library in a fraction of a second. The kernels are compiled for this processor
(``-march=native``); ``LMNET_NATIVE_MARCH`` names another GCC target instead (``x86-64-v3``: the
AVX2 an older laptop has, used by the benchmarks' ``--isa avx2``), built and cached apart; a
target this processor lacks stops the process at the first kernel call (an illegal
instruction), so it is for measuring, not for running. Where it cannot be built (no
compiler, another OS), or with ``LMNET_NATIVE=0``, :func:`native_ops` returns None after a
one-line notice and every caller runs its pure-PyTorch path, which gives the same numbers.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["native_ops", "native_status", "in_plain_eager", "kernel_dtype", "fp32_forward",
           "fp32_backward", "SOURCES"]

log = logging.getLogger(__name__)

#: The C++ sources, compiled into one library.
SOURCES = tuple(Path(__file__).with_name("_native") / name
                for name in ("batchnorm_sum.cpp", "depthwise.cpp", "neighborhood_attention.cpp",
                             "dropout.cpp", "layer_norm.cpp"))


def _flags() -> list[str]:
    """The compiler flags, read once per process with the build's name (see :func:`native_ops`).

    ``-fno-trapping-math``: the kernels never read floating-point exception flags, and without
    it GCC will not vectorise a loop whose select it could only make by computing both sides
    (the activations' derivatives, the softmax's exp) unless the CPU can mask lanes (AVX-512): on
    an AVX2 CPU the BatchNorm kernel's Hardswish and GELU ran one value at a time
    (docs/performance.md). The values stay the same: no reassociation, no assumption about NaN,
    infinities or signed zeros (only a NaN's sign bit may differ).
    """
    march = os.environ.get("LMNET_NATIVE_MARCH") or "native"
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", march):  # it reaches a shell command line
        log.warning("note: LMNET_NATIVE_MARCH=%r is not a compiler target name; using native",
                    march)
        march = "native"
    return ["-O3", f"-march={march}", "-fno-trapping-math", "-fopenmp"]


_state: dict[str, Any] = {}
_lock = threading.Lock()


def _cache_root() -> Path:
    if os.environ.get("LMNET_NATIVE_CACHE"):
        return Path(os.environ["LMNET_NATIVE_CACHE"])
    root = os.environ.get("LMNET_CACHE_DIR")
    if root:
        return Path(root) / "native"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmnet" / "native"


def _build_name(flags: list[str]) -> str:
    from lmnet.runtime import cpu_name

    h = hashlib.sha256(f"{torch.__version__}|{cpu_name()}|{' '.join(flags)}".encode())
    for source in SOURCES:
        h.update(source.read_bytes())
    return "lmnet_native_" + h.hexdigest()[:16]


def in_plain_eager() -> bool:
    """Whether code runs as plain eager PyTorch: not traced, scripted, exported to ONNX or
    compiled, where a native kernel (opaque to those tools) may stand in for PyTorch's ops."""
    return not (torch.jit.is_tracing() or torch.jit.is_scripting()
                or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def kernel_dtype(*tensors: torch.Tensor) -> bool:
    """Whether the native kernels take these tensors: float32, or under CPU bf16 autocast
    (``lmnet train --bf16``) also bf16, which their autograd functions cast to float32
    (:data:`fp32_forward`; their outputs are float32). Not fp16 under fp16 autocast. So bf16
    training keeps the kernels, in float32, and only autocast's own operations (the dense
    convolutions and matrix products, where AMX makes bf16 cheap) compute in bf16."""
    low = (torch.bfloat16 if torch.is_autocast_enabled("cpu")
           and torch.get_autocast_dtype("cpu") == torch.bfloat16 else None)
    return all(t.dtype == torch.float32 or t.dtype == low for t in tensors)


#: An autograd function's ``forward`` under CPU autocast: floating-point inputs cast to float32,
#: autocast off inside (``torch.amp.custom_fwd``); outside autocast nothing changes. Autograd
#: casts each input's gradient back to that input's dtype.
fp32_forward = torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
#: The matching ``backward``: runs with the autocast state of its forward (off).
fp32_backward = torch.amp.custom_bwd(device_type="cpu")


def native_ops(build: bool = True) -> Any | None:
    """``torch.ops.lmnet_native`` once the library is built and loaded (built on first call),
    or None where it cannot be (see the module docstring).

    ``build=False`` (inference): load a library already built on this machine, but do not compile
    one (None then): a first ``lmnet predict`` does not wait a minute for kernels that save a few
    per cent of its time; any training (``lmnet demo`` too) builds them. A library built before
    is loaded directly (no compiler needed), a damaged one built again.
    """
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        if os.environ.get("LMNET_NATIVE", "1") == "0":
            _state["reason"] = "turned off by LMNET_NATIVE=0"
            _state["ops"] = None
            return None
        if "library" not in _state:  # the digest reads the sources: once a process
            _state["flags"] = _flags()  # the build below uses the flags its name was made of
            name = _build_name(_state["flags"])
            _state["library"] = _cache_root() / name / f"{name}.so"
        library = _state["library"]
        folder, name = library.parent, library.stem
        if not build and not library.is_file():
            return None  # not built here yet: inference does not compile
        ops = None
        t0 = time.perf_counter()
        try:
            loaded = False
            if library.is_file():  # built before (keyed by the digest): load it, no compiler
                try:
                    torch.ops.load_library(str(library))
                    loaded = True
                except OSError:
                    if not build:
                        raise
            if not loaded:  # build it (or a damaged library again)
                from torch.utils import cpp_extension

                log.warning("note: building lmnet's native CPU kernels (once per machine, "
                            "about half a minute on two cores)")
                folder.mkdir(parents=True, exist_ok=True)
                cpp_extension.load(name=name, sources=[str(s) for s in SOURCES],
                                   build_directory=str(folder), extra_cflags=_state["flags"],
                                   extra_ldflags=["-fopenmp"],
                                   verbose=False, is_python_module=False)
            ops = torch.ops.lmnet_native
            ops.bn_sum_forward  # noqa: B018 - fails here if the library registered nothing
            _state["seconds"] = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - no compiler, another OS: the PyTorch path
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            _state["reason"] = f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300]
            ops = None
            log.warning("note: lmnet's native CPU kernels could not be built (%s); using "
                        "PyTorch's own operations (the same results, slower on a CPU)",
                        _state["reason"])
        _state["ops"] = ops
        return ops


def native_status() -> dict[str, Any]:
    """``{"available": bool, "build_seconds" | "reason": ...}``: whether the kernels load here,
    and how long building (first use on a machine) or loading (later) took."""
    ops = native_ops()
    if ops is None:
        return {"available": False, "reason": _state.get("reason", "")}
    return {"available": True, "build_seconds": round(float(_state.get("seconds", 0.0)), 2)}
