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
import time
from typing import Any, Callable

__all__ = ["installed_versions", "keep_freed_memory", "available_cpus", "available_memory", "cgroup_cpu_quota", "cpu_name",
           "native_bf16", "amx_bf16", "set_threads", "threads_were_chosen", "ThreadGovernor", "cpu_busy_seconds", "govern_threads",
           "steady_signal_stack"]

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

    chosen = threads is not None or int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1
    if threads is None:
        env = os.environ.get("LMNET_THREADS", "").strip()
        if env:
            chosen = True
            try:
                threads = int(env)
            except ValueError:
                raise ValueError(f"LMNET_THREADS must be a whole number, got {env!r}") from None
        elif os.environ.get("OMP_NUM_THREADS", "").strip():
            _state["threads_chosen"] = True
            return torch.get_num_threads()  # the user's own limit, already applied by torch
        else:
            threads = max(1, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    threads = min(threads, available_cpus())  # more threads than cores only wait on each other
    _state["threads_chosen"] = chosen
    torch.set_num_threads(threads)
    return threads


def govern_threads() -> None:
    """Let :class:`ThreadGovernor` adapt the thread count of the work that follows (the ``lmnet``
    command calls it; a program that imports lmnet may)."""
    _state["govern"] = True


def threads_were_chosen() -> bool:
    """Whether the user fixed the thread count (``--threads``, ``LMNET_THREADS`` or
    ``OMP_NUM_THREADS``): then :class:`ThreadGovernor` leaves it alone."""
    return bool(_state.get("threads_chosen"))


def cpu_busy_seconds(cpus: set[int] | None = None, stat: str = "/proc/stat") -> float | None:
    """Seconds the given CPUs (default: every CPU of ``stat``) have spent busy since boot: user,
    nice, system, irq, softirq and steal (a hypervisor running something else on them); None
    where ``/proc/stat`` cannot be read."""
    try:
        hz = os.sysconf("SC_CLK_TCK")
        total = 0
        for line in open(stat):
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            if cpus is not None and int(name[3:]) not in cpus:
                continue
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
            total += user + nice + system + irq + softirq + steal
        return total / hz
    except (OSError, ValueError, IndexError):
        return None


class ThreadGovernor:
    """Fewer compute threads while other processes keep this machine's cores busy.

    Every parallel region of PyTorch waits for its slowest thread: with 2 threads on 2 cores and
    another process on one of them, a training step took 3-4x as long as on a quiet machine, one
    thread 1.6x (``docs/performance.md``). :meth:`update`, called often (every training step),
    looks every ``interval`` seconds at how much CPU time the machine's other processes took
    since the last look (``/proc/stat`` less this process's own CPU time) and sets PyTorch's
    threads to the cores left free (at least 1, at most ``max_threads``); when they leave, the
    threads come back. It is on in the ``lmnet`` command (:func:`govern_threads`; a program
    using lmnet as a library calls it to opt in) and does nothing where the user chose the
    threads, where ``/proc/stat`` does not describe this process's CPUs (an affinity mask or
    cgroup quota smaller than the machine), or with ``LMNET_THREAD_GOVERNOR=0``.
    """

    def __init__(self, max_threads: int | None = None, interval: float = 5.0,
                 enabled: bool | None = None) -> None:
        import torch

        self.max_threads = int(max_threads or torch.get_num_threads())
        self.interval = interval
        try:
            self.cpus: set[int] | None = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cpus = None
        if enabled is None:
            enabled = (bool(_state.get("govern")) and not threads_were_chosen()
                       and self.max_threads > 1
                       and os.environ.get("LMNET_THREAD_GOVERNOR", "1") != "0"
                       and cgroup_cpu_quota() is None
                       and self.cpus is not None and len(self.cpus) == available_cpus())
        self.enabled = enabled
        self.threads = self.max_threads
        self.changes: list[tuple[float, int, float]] = []  # (time, threads, other processes' cores)
        self._last = (time.perf_counter(), cpu_busy_seconds(self.cpus), self._own())
        if self._last[1] is None:
            self.enabled = False

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def target(self, other_cores: float) -> int:
        """Threads for the cores left by other processes using ``other_cores`` of them."""
        free = (len(self.cpus) if self.cpus else self.max_threads) - other_cores
        return max(1, min(self.max_threads, int(free + 0.25)))

    def update(self) -> int | None:
        """Look again if ``interval`` has passed; returns the new thread count when it changed."""
        if not self.enabled:
            return None
        now = time.perf_counter()
        if now - self._last[0] < self.interval:
            return None
        busy, own = cpu_busy_seconds(self.cpus), self._own()
        if busy is None:
            return None
        wall = now - self._last[0]
        other = max(0.0, (busy - self._last[1]) - (own - self._last[2])) / wall
        self._last = (now, busy, own)
        threads = self.target(other)
        if threads == self.threads:
            return None
        import torch

        torch.set_num_threads(threads)
        self.threads = threads
        self.changes.append((now, threads, round(other, 2)))
        return threads


#: Installed distributions under the names lmnet records them by, where the two differ.
_DISTRIBUTIONS = {"cv2": ("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
                  "PIL": ("pillow",)}


def installed_versions(*names: str) -> dict[str, str | None]:
    """The installed version of each package (``torch``, ``openvino``, ``cv2``, ``PIL``...), None
    where it is not installed; read from the package metadata, so nothing is imported."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        out[name] = None
        for dist in _DISTRIBUTIONS.get(name, (name,)):
            try:
                out[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


def _cpuinfo() -> tuple[str, set[str]]:
    """The processor's model name and instruction-set flags from ``/proc/cpuinfo`` (Linux; elsewhere
    the platform's name and no flags)."""
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
        pass
    return name, flags


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), with its widest vector and matrix
    instruction sets, e.g. ``AMD EPYC (avx2)`` or ``... (avx512, avx512_bf16, amx)``."""
    name, flags = _cpuinfo()
    shown = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    if not shown and "avx2" in flags:
        shown = ["avx2"]
    return f"{name} ({', '.join(shown)})" if shown else name


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16), where bf16 inference
    can be faster than fp32; elsewhere it is emulated and slower. Where ``/proc/cpuinfo`` is
    missing, oneDNN's own check decides."""
    return _cpu_has({"avx512_bf16", "amx_bf16"},
                    lambda torch: torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amx_bf16() -> bool:
    """Whether this CPU has AMX's bf16 matrix instructions (``amx_bf16`` in ``/proc/cpuinfo``),
    the hardware where bf16 convolutions run several times faster than fp32 ones; with
    AVX512-BF16 alone they run slower than fp32 (``docs/performance.md``)."""
    return _cpu_has({"amx_bf16"}, lambda torch: torch.cpu._is_amx_tile_supported())


def _cpu_has(any_of: set[str], torch_check: Callable[[Any], Any]) -> bool:
    """Whether ``/proc/cpuinfo`` lists one of the flags ``any_of``; where it lists none (another
    OS), PyTorch's own check ``torch_check(torch)``, False where that is missing."""
    _, flags = _cpuinfo()
    if flags:
        return bool(flags & any_of)
    import torch

    try:
        return bool(torch_check(torch))
    except (AttributeError, RuntimeError):
        return False


#: lmnet's alternate signal stack: allocated once, never freed (256 KiB: the kernel's signal frame
#: with AVX-512 and AMX state is about 12 KiB, and a handler runs on top of it)
_SIGNAL_STACK: dict[str, object] = {}


def steady_signal_stack() -> bool:
    """Give the calling thread an alternate signal stack that lives as long as the process; True
    where it was installed (Linux, glibc).

    OpenVINO's CPU plugin installs its own alternate signal stack on the thread that compiles a
    model, and puts back the one it found when it is released (both seen with ``sigaltstack``).
    Released in another order than they were made (several models, a garbage collector), such
    swaps can presumably leave a stack that was already freed. Python
    runs every signal handler on the alternate stack (``SA_ONSTACK``), so the next signal (Ctrl-C,
    the tests' SIGINT) then has nowhere to go: the kernel kills the process with a segmentation
    fault that no handler sees (seen in CI, ``si_code`` SI_KERNEL, in ``kill``). Calling this
    before and after OpenVINO compiles, and before lmnet installs its signal handlers, means any
    stack OpenVINO saves and restores is this one, which is never freed."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    class _Stack(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if "buffer" not in _SIGNAL_STACK:
            _SIGNAL_STACK["buffer"] = ctypes.create_string_buffer(256 * 1024)
        buf = _SIGNAL_STACK["buffer"]
        new = _Stack(ctypes.cast(buf, ctypes.c_void_p), 0, ctypes.sizeof(buf))
        return libc.sigaltstack(ctypes.byref(new), None) == 0
    except (OSError, AttributeError):
        return False
