"""What an experiment's runs hold on disk: how far each has trained, the wall-clock it has used,
whether it is evaluated, the lock of the process training it, and the step times its plan measured.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

from lmnet._files import atomic_write_text
from lmnet.config import TrainConfig
from lmnet.engine.experiment_matrix import ExperimentConfig, Run
from lmnet.run_folder import RunFolder

__all__ = ["check_recipes", "eval_dir", "log_rows", "budget_record", "add_used_seconds",
           "used_seconds", "run_status", "estimate_seconds", "run_lock", "training_elsewhere",
           "cached_step_seconds"]


#: Keys a run may differ in from its plan: where it is, its wall-clock cap, how it loads data.
_FREE_KEYS = {"out", "name", "time_budget", "num_workers", "device", "data"}


def check_recipes(runs: list[Run], budget_minutes: float | None = None) -> None:
    """A ``ValueError`` if a run folder already holds a run trained with another recipe or
    wall-clock budget than planned (an edited config, or another experiment sharing the ``runs``
    folder)."""
    for run in runs:
        path = RunFolder(run.run_dir).config
        if not path.is_file():
            continue
        held = TrainConfig.from_dict(json.loads(path.read_text())).to_dict()
        planned = run.config.to_dict()
        differ = [f"{k} {held.get(k)!r} there, {v!r} here" for k, v in planned.items()
                  if k not in _FREE_KEYS and held.get(k) != v]
        held_budget = budget_record(run).get("budget_minutes", "unrecorded")
        if held_budget != "unrecorded" and held_budget != budget_minutes:
            differ.append(f"budget_minutes {held_budget!r} there, {budget_minutes!r} here")
        if differ:
            raise ValueError(f"{run.run_dir} holds a run of another recipe ({'; '.join(differ[:3])}"
                             f"{'; ...' if len(differ) > 3 else ''}): give this experiment its own "
                             "'runs' folder, or move that run away")


def eval_dir(run: Run, cfg: ExperimentConfig) -> Path:
    return RunFolder(run.run_dir).eval_dir(cfg.split, cfg.grid)


def log_rows(run: Run) -> list[dict[str, str]]:
    return RunFolder(run.run_dir).read_log()


def _budget_file(run: Run) -> Path:
    return RunFolder(run.run_dir).budget


def budget_record(run: Run) -> dict[str, Any]:
    """What the runner has recorded of the run's budget: ``budget_minutes`` (the cap it was
    trained under) and ``seconds`` (wall-clock of its ``train`` calls, validation included)."""
    try:
        return json.loads(_budget_file(run).read_text())
    except (OSError, ValueError):
        return {}


def add_used_seconds(run: Run, cfg: ExperimentConfig, seconds: float) -> None:
    record = budget_record(run)
    record = {"budget_minutes": cfg.budget_minutes,
              "seconds": round(float(record.get("seconds", 0.0)) + seconds, 1)}
    atomic_write_text(_budget_file(run), json.dumps(record) + "\n")


def used_seconds(run: Run) -> float:
    """Wall-clock seconds the run has spent training, as its budget counts them: the runner's
    record of its ``train`` calls (validation included, as ``train``'s own budget check counts);
    for a run trained outside the runner, its logged epochs and the steps of a cut epoch."""
    record = budget_record(run)
    if "seconds" in record:
        return float(record["seconds"])
    spent = sum(float(r["epoch_seconds"]) for r in log_rows(run))
    last = RunFolder(run.run_dir).last
    if last.is_file():
        from lmnet.deploy.checkpoint import load_checkpoint

        partial = load_checkpoint(last).get("partial")
        spent += float(partial["seconds"]) if partial else 0.0
    return spent


def _finished(run: Run, cfg: ExperimentConfig) -> bool:
    """All epochs trained, or the run's wall-clock budget spent (its schedule then unfinished)."""
    if len(log_rows(run)) >= run.config.epochs:
        return True
    return cfg.budget_minutes is not None and used_seconds(run) >= cfg.budget_minutes * 60


def run_status(run: Run, cfg: ExperimentConfig) -> str:
    """``done`` (trained and evaluated), ``trained``, ``partial`` (cut short) or ``new``."""
    trained = _finished(run, cfg)
    if trained and (eval_dir(run, cfg) / "metrics.json").is_file():
        return "done"
    if trained:
        return "trained"
    return "partial" if RunFolder(run.run_dir).last.is_file() else "new"


def estimate_seconds(run: Run, n_train: int, step_times: dict[str, float]) -> float:
    """Training time of the epochs left, from a measured step time of this model and size."""
    cfg = run.config
    done = len(log_rows(run))
    per_epoch = 0.0
    for epoch in range(done, cfg.epochs):
        size = cfg.train_size(epoch)
        per_epoch += math.ceil(n_train / cfg.batch_size) * step_times[f"{run.label}@{size}"]
    estimate = 1.15 * per_epoch  # data loading and validation
    if cfg.time_budget:
        estimate = min(estimate, max(0.0, cfg.time_budget * 60 - used_seconds(run)))
    return estimate


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[int | None]:
    """Hold ``run_dir/.lock`` while this process trains or evaluates the run; yields None, or the
    process id of another live process that holds it (the run is then left to that process). A
    lock left by a process that died is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunFolder(run_dir).lock
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None:
                yield holder
                return
            path.unlink(missing_ok=True)  # stale
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        try:
            yield None
        finally:
            path.unlink(missing_ok=True)
        return
    raise RuntimeError(f"cannot take the lock {path}")  # pragma: no cover - lost a race twice


def training_elsewhere(runs: list[Run]) -> tuple[int, Path] | None:
    """``(pid, run folder)`` of a live process other than this one that holds the lock of a run
    in the runs folders of ``runs`` (another matrix training there), else None."""
    for root in dict.fromkeys(r.run_dir.parent for r in runs):
        for lock in sorted(root.glob(f"*/{RunFolder.LOCK}")):
            pid = _lock_holder(lock)
            if pid is not None:
                return pid, lock.parent
    return None


def _lock_holder(lock: Path) -> int | None:
    """The process id in a run's ``.lock`` if it is a live process other than this one."""
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and pid != os.getpid() and _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cached_step_seconds(run: Run, size: int, measure: Any, keep: bool = True) -> float:
    """``measure(run.config, size)`` (a timed training step), kept in the runs folder's
    ``step_seconds.json`` per model, options, size, batch, precision, threads and CPU, so that
    planning a matrix again (every resume) does not time every model again. ``keep=False``: a time
    taken beside another training process is used for this plan only, never kept."""
    import torch

    from lmnet.runtime import cpu_name

    c = run.config
    key = json.dumps([c.model, c.model_args, size, c.batch_size, c.grad_accum, c.channels_last,
                      c.bf16, c.in_channels, c.n_classes, c.device, torch.get_num_threads(),
                      cpu_name()], sort_keys=True)
    path = run.run_dir.parent / "step_seconds.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        seconds = measure(c, size)
        if not keep:
            return float(seconds)
        cache[key] = seconds
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(cache, indent=1) + "\n")
        except OSError:
            pass
    return float(cache[key])
