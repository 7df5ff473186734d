"""Shared fixtures and helpers for the test suite."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"

# Engine probes (--engine auto) cache their choice per machine: the tests keep theirs apart.
# ... and remove it when the process ends (each pytest-xdist worker has its own).
os.environ["LMNET_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmnet-test-cache-")
atexit.register(shutil.rmtree, os.environ["LMNET_CACHE_DIR"], ignore_errors=True)
# ... but the native kernels' build (keyed by a digest of sources, flags, CPU and torch) is shared
# with the user's, so that a test run compiles them at most once per machine.
os.environ.setdefault("LMNET_NATIVE_CACHE", str(Path.home() / ".cache" / "lmnet" / "native"))
# The thread governor would follow other processes' load: runs compared for exactness keep theirs.
os.environ["LMNET_THREAD_GOVERNOR"] = "0"
# Under pytest-xdist (pyproject's ``-n auto``: a worker per CPU) the workers share the cores, so
# each computes on its share of them, and so do the commands the tests start (LMNET_THREADS and
# OMP_NUM_THREADS): two workers of two threads each on two cores wait on each other's descheduled
# threads, slower than one worker alone.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    from lmnet.runtime import available_cpus

    _share = max(1, available_cpus() // _WORKERS)
    os.environ["LMNET_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)

# A crash in native code (a segmentation fault) kills pytest before it reports: with
# LMNET_CRASH_LOG set (CI sets it and turns pytest's own faulthandler off) every thread's Python
# stack goes to that file, which CI prints after a failed run.
_crash_log = None
if os.environ.get("LMNET_CRASH_LOG"):
    import faulthandler

    # one file a worker under pytest-xdist (LOG.gw0, LOG.gw1, ...)
    _crash_log = open(os.environ["LMNET_CRASH_LOG"] + (f".{_WORKER}" if _WORKER else ""),  # noqa: SIM115
                      "w")  # open until the process ends
    faulthandler.enable(file=_crash_log, all_threads=True)


#: Memory one test worker may need at its peak (the paper recipe's dry run stays under 6 GiB in
#: its own process; the int8 and OpenVINO tests about 2 GiB).
WORKER_MEMORY = 4 * 2**30


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per CPU this process may use (its affinity and cgroup quota, not the
    machine's count), fewer where the free memory would not hold them."""
    from lmnet.runtime import available_cpus, available_memory

    memory = available_memory()
    by_memory = max(1, int(memory // WORKER_MEMORY)) if memory else available_cpus()
    return max(1, min(available_cpus(), by_memory))


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    if _crash_log is not None:  # the crash log names the test that was running
        try:
            _crash_log.write(f"running {nodeid}\n")
            _crash_log.flush()
        except OSError:  # a full disk: the tests' own failures say so, not pytest's internals
            pass


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained LM-Net checkpoint at 32 x 32 (``checkpoint_best.pt`` in a run folder)."""
    from lmnet.config import TrainConfig
    from lmnet.models import create_model

    run = tmp_path_factory.mktemp("tiny_run")
    cfg = TrainConfig(data="unused", image_size=32)
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model("lmnet"))
    torch.save({"config": cfg.to_dict(), "model": model.state_dict()}, run / "checkpoint_best.pt")
    return run


def real_dataset(name: str) -> Path:
    """``../shared/datasets/<name>``, or skip the test with a reason that names the folder."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"needs the real data set in {path} (not part of a clone of the repository)")
    return path


@pytest.fixture(scope="session")
def disc_data(tmp_path_factory) -> Path:
    from tests.miniatures import make_discs

    return make_discs(tmp_path_factory.mktemp("discs") / "data")


@pytest.fixture(scope="session")
def kvasir_mini(tmp_path_factory) -> Path:
    from tests.miniatures import make_kvasir

    return make_kvasir(tmp_path_factory.mktemp("kvasir") / "kvasir-seg")


@pytest.fixture(scope="session")
def busi_mini(tmp_path_factory) -> Path:
    from tests.miniatures import make_busi

    return make_busi(tmp_path_factory.mktemp("busi") / "busi")


@pytest.fixture(scope="session")
def lgg_mini(tmp_path_factory) -> Path:
    from tests.miniatures import make_lgg

    return make_lgg(tmp_path_factory.mktemp("lgg") / "lgg")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A real one-epoch run at 32 x 32 on a Kvasir-SEG miniature: ``(run folder, data folder)``."""
    from lmnet.config import TrainConfig
    from lmnet.engine.train import train
    from tests.miniatures import make_kvasir

    data = make_kvasir(tmp_path_factory.mktemp("tiny_kv") / "kvasir-seg", n=12)
    cfg = TrainConfig(data=str(data), image_size=32, batch_size=4, epochs=1,
                      split_ratios=[0.5, 0.25, 0.25], out=str(tmp_path_factory.mktemp("runs")),
                      name="tiny")
    return train(cfg, progress=False), data


@pytest.fixture()
def sigint_as_in_a_terminal():
    """SIGINT raises KeyboardInterrupt during the test, as in a terminal, even where the suite runs
    as a background job (``pytest &`` or ``nohup``), whose SIGINT is inherited as ignored and which
    lmnet's training rightly leaves ignored."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture()
def ctrl_c_at_step(monkeypatch, sigint_as_in_a_terminal):
    """``ctrl_c_at_step(n[, sig])``: the n-th loss computation from now on presses Ctrl-C (a real
    SIGINT to this process, or ``sig``), as a user would in the middle of a training step."""
    import os
    import signal

    from lmnet.losses import SegmentationLoss

    forward = SegmentationLoss.forward

    def arm(n: int, sig: int = signal.SIGINT) -> None:
        calls = []

        def pressing(self, *args):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), sig)
            return forward(self, *args)

        monkeypatch.setattr(SegmentationLoss, "forward", pressing)

    yield arm
    monkeypatch.setattr(SegmentationLoss, "forward", forward)


def biases_before_batchnorm(module: nn.Module) -> set[str]:
    """Names of conv biases that feed a training-mode BatchNorm straight away (a block's expand
    conv, a ConvBnAct's conv): their gradient is exactly zero in exact arithmetic."""
    from lmnet.layers import ConvBnAct, MultiBranchBlock

    names = set()
    for prefix, m in module.named_modules():
        pairs = {MultiBranchBlock: ("expand", "expand_bn"), ConvBnAct: ("conv", "bn")}.get(type(m))
        if pairs and isinstance(getattr(m, pairs[1]), nn.BatchNorm2d):
            names.add(f"{prefix}.{pairs[0]}.bias".lstrip("."))
    return names
