"""lmnet.runtime: keeping freed memory in the process (no page-fault storm per forward pass)."""
from __future__ import annotations

import json
import resource
import sys

import numpy as np
import pytest
import torch

from lmnet.runtime import keep_freed_memory


def test_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LMNET_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_freed_blocks_are_reused_without_page_faults():
    assert keep_freed_memory() is True
    def churn() -> None:  # allocate, touch and free 48 MiB five times
        for _ in range(5):
            torch.empty(12 << 20).fill_(1.0)
    for _ in range(3):  # the heap grows to hold the block first
        churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # With glibc's defaults a block over 32 MiB is always a fresh mmap: 12,288 faults per block.
    assert faults < 1000, faults


def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path):
    from lmnet.runtime import cgroup_cpu_quota

    assert cgroup_cpu_quota(str(tmp_path)) is None  # no files: unlimited
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(str(tmp_path)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_quota(str(v1)) == 1.0


def test_threads_default_to_the_usable_cpus_and_follow_flag_and_env(monkeypatch):
    import os

    from lmnet.cli.main import main
    from lmnet.runtime import available_cpus, set_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LMNET_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert available_cpus() == 1 and set_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        monkeypatch.setattr("lmnet.runtime.cgroup_cpu_quota", lambda: 2.0)
        assert available_cpus() == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes share them
        assert set_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's limit stands
        torch.set_num_threads(1)
        assert set_threads() == 1
        monkeypatch.setenv("LMNET_THREADS", "3")  # more than the 2 usable CPUs: capped
        assert set_threads() == 2 and torch.get_num_threads() == 2
        assert main(["list-models", "--threads", "1"]) == 0 and torch.get_num_threads() == 1
        assert main(["list-models", "--threads", "0"]) == 2
    finally:
        torch.set_num_threads(before)


def _stat(path, busy_jiffies):
    """A /proc/stat with two CPUs, each busy for the given jiffies (user time) so far."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{i} {b} 0 0 1000 0 0 0 0 0 0" for i, b in enumerate(busy_jiffies)]
    path.write_text("\n".join(lines) + "\nintr 0\n")
    return str(path)


def test_cpu_busy_seconds_reads_the_chosen_cpus(tmp_path):
    import os

    from lmnet.runtime import cpu_busy_seconds

    hz = os.sysconf("SC_CLK_TCK")
    stat = _stat(tmp_path / "stat", [3 * hz, 5 * hz])
    assert cpu_busy_seconds(None, stat) == 8.0
    assert cpu_busy_seconds({1}, stat) == 5.0
    assert cpu_busy_seconds(None, str(tmp_path / "missing")) is None


def test_thread_governor_gives_the_free_cores_and_takes_them_back(monkeypatch):
    """Another process keeping one of two cores busy: one thread; gone again: two."""
    import os

    import lmnet.runtime as runtime
    from lmnet.runtime import ThreadGovernor

    before = torch.get_num_threads()
    clock, busy, own = [100.0], [0.0], [0.0]
    monkeypatch.setattr("time.perf_counter", lambda: clock[0])
    monkeypatch.setattr(runtime, "cpu_busy_seconds", lambda cpus=None, stat=None: busy[0])
    monkeypatch.setattr(os, "times", lambda: os.times_result((own[0], 0.0, 0.0, 0.0, 0.0)))
    try:
        torch.set_num_threads(2)
        gov = ThreadGovernor(max_threads=2, interval=5.0, enabled=True)
        gov.cpus = {0, 1}

        def advance(seconds, ours, others):
            clock[0] += seconds
            own[0] += ours * seconds
            busy[0] += (ours + others) * seconds
            return gov.update()

        assert advance(1.0, 2.0, 1.0) is None           # before the interval: no look
        assert advance(5.0, 1.0, 1.0) == 1 and torch.get_num_threads() == 1  # one core taken
        assert advance(6.0, 1.0, 1.0) is None           # still taken: unchanged
        assert advance(6.0, 1.0, 0.05) == 2 and torch.get_num_threads() == 2  # free again
        assert [c[1] for c in gov.changes] == [2 - 1, 2]
        assert gov.target(0.3) == 1 and gov.target(0.1) == 2 and gov.target(3.0) == 1
    finally:
        torch.set_num_threads(before)


def test_thread_governor_is_off_where_the_user_chose_threads(monkeypatch):
    import os

    import lmnet.runtime as runtime
    from lmnet.runtime import (
        ThreadGovernor,
        available_cpus,
        cgroup_cpu_quota,
        govern_threads,
        set_threads,
    )

    monkeypatch.setenv("LMNET_THREAD_GOVERNOR", "1")
    monkeypatch.delenv("LMNET_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        runtime._state.pop("threads_chosen", None)
        runtime._state.pop("govern", None)
        assert ThreadGovernor(max_threads=2).enabled is False  # a library call: not opted in
        govern_threads()
        machine_fits = cgroup_cpu_quota() is None and len(os.sched_getaffinity(0)) == available_cpus()
        assert ThreadGovernor(max_threads=2).enabled is machine_fits  # the lmnet command
        set_threads(1)
        assert ThreadGovernor(max_threads=2).enabled is False  # --threads 1: left alone
    finally:
        runtime._state.pop("threads_chosen", None)
        runtime._state.pop("govern", None)
        torch.set_num_threads(before)


def test_run_folder_owns_the_names_and_the_small_files(tmp_path):
    from lmnet.run_folder import RunFolder

    run = RunFolder(tmp_path / "r")
    assert not RunFolder.holds_run(run.path) and run.checkpoint() is None
    assert run.read_config() is None and run.read_split() is None and run.read_env() == {}
    run.path.mkdir()
    run.write_config({"epochs": 3})
    assert not RunFolder.holds_run(run.path)  # a config alone is not a run
    run.log.write_text("epoch\n")
    assert RunFolder.holds_run(run.path) and run.read_config() == {"epochs": 3}
    run.write_env({"cpu": "x"})
    run.add_session({"epochs_done": 0})
    run.add_session({"epochs_done": 2})
    assert run.read_env() == {"cpu": "x"}
    assert [json.loads(x)["epochs_done"] for x in run.sessions.read_text().splitlines()] == [0, 2]
    run.last.write_bytes(b"")
    assert run.checkpoint() == run.last
    run.best.write_bytes(b"")
    assert run.checkpoint() == run.best  # the best is preferred
    assert run / "tb" == run.tensorboard


def test_installed_versions_come_from_the_metadata_without_importing():
    from lmnet.runtime import installed_versions

    found = installed_versions("torch", "PIL", "no-such-package-lmnet")
    assert found["torch"] == torch.__version__
    import PIL

    assert found["PIL"] == PIL.__version__ and found["no-such-package-lmnet"] is None


def _signal_stack() -> tuple[int, int]:
    import ctypes

    class _Stack(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    old = _Stack()
    ctypes.CDLL(None).sigaltstack(None, ctypes.byref(old))
    return old.ss_sp or 0, old.ss_size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack: Linux")
def test_openvino_leaves_a_signal_stack_that_outlives_it(sigint_as_in_a_terminal):
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack when it compiles (and may
    put back a freed one later: a segfault at the next Ctrl-C). After lmnet compiles, the stack is
    lmnet's own, which is never freed, and a SIGINT is still an ordinary KeyboardInterrupt."""
    import gc
    import os
    import signal

    ov = pytest.importorskip("openvino")
    from torch import nn

    from lmnet.deploy.backends import _compile
    from lmnet.runtime import steady_signal_stack

    assert steady_signal_stack()
    ours = _signal_stack()
    assert ours[1] == 256 * 1024
    model = ov.convert_model(nn.Conv2d(3, 2, 3, padding=1).eval(), example_input=torch.randn(1, 3, 8, 8))
    compiled = _compile(ov.Core(), model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    compiled(np.zeros((1, 3, 8, 8), np.float32))
    assert _signal_stack() == ours
    del compiled, model
    gc.collect()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # the handler runs between bytecodes
            pass


def test_the_suite_takes_a_worker_per_usable_cpu_that_memory_holds(monkeypatch):
    """``pytest`` (``-n auto``): as many workers as CPUs this process may use, fewer where the free
    memory would not hold them, at least one."""
    import lmnet.runtime
    from tests.conftest import WORKER_MEMORY, pytest_xdist_auto_num_workers

    monkeypatch.setattr(lmnet.runtime, "available_cpus", lambda: 8)
    for memory, workers in ((None, 8), (64 * WORKER_MEMORY, 8), (2.5 * WORKER_MEMORY, 2),
                            (WORKER_MEMORY // 2, 1)):
        monkeypatch.setattr(lmnet.runtime, "available_memory", lambda m=memory: m)
        assert pytest_xdist_auto_num_workers(None) == workers, memory
