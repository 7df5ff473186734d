"""Process-wide settings that make PyTorch faster on a CPU.

glibc's ``malloc`` serves a block larger than its mmap threshold with a fresh ``mmap`` and unmaps it
on ``free``; the threshold starts at 128 KiB and rises after each such free, but never above
32 MiB, and free memory at the top of the heap is handed back too. PyTorch on a CPU allocates and
frees its activations on every forward pass, so large blocks keep coming back as fresh pages that
the kernel must zero-fill: a training step at 256 x 256, batch 8, has many blocks over 32 MiB, and
how often smaller ones are reused depends on the process's history. :func:`keep_freed_memory`
raises the mmap and trim thresholds so that freed blocks stay in the process and are reused
(measured effect in ``docs/performance.md``).

The ``lmnet`` command calls it at start; a program that imports lmnet as a library can call it
itself, or set ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` in the environment, or
preload jemalloc / tcmalloc. ``LMNET_KEEP_FREED_MEMORY=0`` turns the CLI's call off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory", "available_cpus", "available_memory", "cgroup_cpu_quota", "cpu_name",
           "set_threads"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_state: dict[str, bool] = {}


def keep_freed_memory(threshold_bytes: int = 2**31 - 1) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold_bytes`` (2 GiB, the largest value
    ``mallopt`` takes).

    Blocks below the threshold come from the heap and are reused after ``free``. The cost is
    memory: the process keeps its peak heap instead of handing it back to the system.

    Returns:
        True if the thresholds were set (Linux with glibc), False elsewhere or when
        ``LMNET_KEEP_FREED_MEMORY=0``.
    """
    if os.environ.get("LMNET_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "done" in _state:
        return _state["done"]
    ok = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        # mallopt returns 1 on success; old glibc caps the mmap threshold at 32 MiB, and musl or
        # other libcs lack mallopt (AttributeError).
        for value in (min(threshold_bytes, 2**31 - 1), min(threshold_bytes, 32 << 20)):
            if mallopt(_M_MMAP_THRESHOLD, value) and mallopt(_M_TRIM_THRESHOLD, value):
                ok = True
                break
    except (OSError, AttributeError):
        ok = False
    _state["done"] = ok
    return ok


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs the cgroup quota allows (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None if unlimited."""
    try:
        quota, period = open(os.path.join(root, "cpu.max")).read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(open(os.path.join(root, "cpu", "cpu.cfs_quota_us")).read())
        period = int(open(os.path.join(root, "cpu", "cpu.cfs_period_us")).read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_memory(meminfo: str = "/proc/meminfo", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes of memory a new allocation may use now: ``MemAvailable``, capped by a cgroup memory
    limit (v2 ``memory.max`` less ``memory.current``, v1 ``memory.limit_in_bytes``); None where
    neither can be read."""
    found: list[int] = []
    try:
        for line in open(meminfo):
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = open(os.path.join(root, "memory.max")).read().strip()
        if limit != "max":
            used = int(open(os.path.join(root, "memory.current")).read())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        try:
            limit_v1 = int(open(os.path.join(root, "memory", "memory.limit_in_bytes")).read())
            if limit_v1 < 1 << 60:
                found.append(limit_v1)
        except (OSError, ValueError):
            pass
    return min(found) if found else None


def available_cpus() -> int:
    """The CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


def set_threads(threads: int | None = None) -> int:
    """Give PyTorch ``threads`` compute threads (default: ``LMNET_THREADS``, else ``OMP_NUM_THREADS``
    as PyTorch applied it, else :func:`available_cpus` shared among the processes ``torchrun``
    started on this machine); returns the number in use.

    More threads than free cores is far worse than fewer: when another process holds a core, every
    parallel region waits for its slowest thread (a 128 x 128 forward pass measured 3.8 s with 2
    threads against 0.08 s with 1 on a busy 2-core machine). On a shared machine, pass fewer.
    A number above :func:`available_cpus` is capped to it (the CLI says so in one line).
    """
    import torch

    if threads is None:
        env = os.environ.get("LMNET_THREADS", "").strip()
        if env:
            try:
                threads = int(env)
            except ValueError:
                raise ValueError(f"LMNET_THREADS must be a whole number, got {env!r}") from None
        elif os.environ.get("OMP_NUM_THREADS", "").strip():
            return torch.get_num_threads()  # the user's own limit, already applied by torch
        else:
            threads = max(1, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    threads = min(threads, available_cpus())  # more threads than cores only wait on each other
    torch.set_num_threads(threads)
    return threads


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), with its widest vector and matrix
    instruction sets, e.g. ``AMD EPYC (avx2)`` or ``... (avx512, avx512_bf16, amx)``."""
    import platform
    from pathlib import Path

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return name
    shown = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    if not shown and "avx2" in flags:
        shown = ["avx2"]
    return f"{name} ({', '.join(shown)})" if shown else name
