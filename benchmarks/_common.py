"""Shared pieces of the benchmarks: the naive reference attention, timing, machine description.

Every script imports this module before torch: it first gives oneDNN room for every variant's
compiled kernels (see :func:`interleaved_times`).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")  # read when torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

import lmnet.layers.neighborhood_attention as na_module  # noqa: E402
from lmnet.layers.neighborhood_attention import neighborhood_window_index  # noqa: E402


def naive_neighborhood_attention_2d(q, k, v, num_heads, kernel_size, rpb=None, scale=None):
    """The naive reference: gather every window into a (B, heads, H, W, k*k, d) copy, then matmul.

    Same results as :func:`lmnet.layers.neighborhood_attention_2d` (channels-first inputs).
    """
    B, C, H, W = q.shape
    h, d, ks = num_heads, C // num_heads, kernel_size
    scale = d ** -0.5 if scale is None else scale
    rk, rb = neighborhood_window_index(H, ks, q.device)
    ck, cb = neighborhood_window_index(W, ks, q.device)

    def windows(t):  # (B, C, H, W) -> (B, h, H, W, k*k, d)
        t = t.reshape(B, h, d, H, W).permute(0, 1, 3, 4, 2)  # (B, h, H, W, d)
        g = t[:, :, rk[:, :, None, None], ck[None, None, :, :]]  # (B, h, H, k, W, k, d)
        return g.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, h, H, W, ks * ks, d)

    qh = q.reshape(B, h, d, H, W).permute(0, 1, 3, 4, 2)[..., None, :] * scale  # (B,h,H,W,1,d)
    attn = (qh @ windows(k).transpose(-1, -2))[..., 0, :]  # (B, h, H, W, k*k)
    if rpb is not None:
        bias = rpb[:, rb[:, None, :, None], cb[None, :, None, :]]  # (h, H, W, k, k)
        attn = attn + bias.reshape(h, H, W, ks * ks)
    attn = attn.softmax(-1)
    out = (attn[..., None, :] @ windows(v))[..., 0, :]  # (B, h, H, W, d)
    return out.permute(0, 1, 4, 2, 3).reshape(B, C, H, W)


@contextlib.contextmanager
def naive_attention() -> Iterator[None]:
    """Within the block, every NeighborhoodAttention2d uses the naive reference."""
    fast = na_module.neighborhood_attention_2d
    na_module.neighborhood_attention_2d = naive_neighborhood_attention_2d
    try:
        yield
    finally:
        na_module.neighborhood_attention_2d = fast


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved_times(fns: dict[Any, Callable[[], Any]], repeats: int, per_round: int = 3,
                      warmup: int = 2) -> dict[Any, list[float]]:
    """Wall-clock seconds of ``repeats`` calls of every function, taken in rounds.

    Each round calls every function ``per_round`` times, one function after the other, so that a
    noisy period of this shared machine slows all of them alike instead of one variant's block.
    Run in turn, fp32 / bf16 and channels-first / -last variants (forward and backward) overflow
    oneDNN's default cache of 1024 compiled kernels, and every step recompiles its kernels (7x
    slower training steps seen here): this module sets ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=16384``
    before torch loads.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[Any, list[float]] = {key: [] for key in fns}
    for _ in range(-(-repeats // per_round)):
        for key, fn in fns.items():
            out[key] += time_call(fn, per_round, warmup=0)
    return out


def summarize_times(times: list[float], batch: int) -> dict[str, float]:
    """Median and interquartile range in ms per image, and images per second."""
    per_img = np.asarray(times) * 1e3 / batch
    q1, med, q3 = np.percentile(per_img, [25, 50, 75])
    return {"ms_per_image_median": round(float(med), 2), "ms_per_image_iqr": round(float(q3 - q1), 2),
            "images_per_second": round(1e3 / float(med), 2), "runs": len(times)}


#: ``--isa``: run as a CPU with only this vector instruction set would (PyTorch's kernels, oneDNN's
#: and lmnet's native build), on a machine that has more. Many laptops have AVX2 only. PyTorch
#: and lmnet only: OpenVINO's CPU plugin fails under ``ONEDNN_MAX_CPU_ISA`` ("node is not
#: initialized", or a crash), and Inductor's code gave wrong values under ``ATEN_CPU_CAPABILITY``
#: on an AVX-512 machine (torch 2.13), so neither is timed or tested this way.
ISA_LIMITS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                       "LMNET_NATIVE_MARCH": "x86-64-v3"}}


def limit_isa(isa: str | None) -> None:
    """Run this script again in a fresh process limited to ``isa`` (the limits are read when
    PyTorch and oneDNN load, so they cannot be set in this one); nothing where ``isa`` is None
    or the limits are already set."""
    if not isa:
        return
    wanted = ISA_LIMITS[isa]
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv: the interpreter's own options (-u, -X ...) too
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **wanted})


def machine() -> dict[str, Any]:
    import onnxruntime

    import lmnet

    try:
        from lmnet.runtime import cpu_name  # model name with its vector instruction sets

        cpu = cpu_name()
    except ImportError:  # an older checkout
        cpu = platform.processor()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return {"cpu": cpu, "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "lmnet": lmnet.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_limits": {k: os.environ[k] for k in ISA_LIMITS["avx2"] if k in os.environ},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    widths = [max(len(h), *(len(str(r.get(k, ""))) for r in rows)) for h, k in columns]
    print("  ".join(h.ljust(w) for (h, _), w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(k, "")).ljust(w) for (_, k), w in zip(columns, widths)))


def report(rows: list[dict[str, Any]], columns: list[tuple[str, str]], out: str | Path,
           machine_info: dict[str, Any], **extra: Any) -> None:
    """Print the table of the rows without an error, write the JSON with the command that made it."""
    import sys

    print()
    print_table([r for r in rows if "error" not in r], columns)
    cmd = f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
    write_json(out, {"command": cmd.strip(), "machine": machine_info, **extra, "rows": rows})
    print(f"\nwrote {out}")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


_SCRATCH: list[tempfile.TemporaryDirectory] = []


def scratch_dir() -> str:
    """A temporary folder, removed when the script ends (benchmarks leave no files behind)."""
    _SCRATCH.append(tempfile.TemporaryDirectory(prefix="lmnet-bench-"))
    return _SCRATCH[-1].name
