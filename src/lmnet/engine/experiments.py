"""``lmnet experiment``: a matrix of models x seeds (or folds) trained and evaluated with one recipe
and budget, and the tables of whatever has finished.

A config (YAML) names one dataset, one recipe (any :class:`~lmnet.config.TrainConfig` key), a
budget per run, the models (registered names, or labelled variants with options) and the seeds;
``settings`` holds named alternatives of the recipe (``--setting gpu``: the paper's full recipe).
Each run is an ordinary run folder of ``lmnet train`` under ``<out>/<name>/runs/``, evaluated with
``lmnet evaluate``'s code. A run that is complete and evaluated is skipped, a run cut short is
resumed, and the tables are rewritten after every run from the runs that have finished.

The pieces, bottom-up: :mod:`~lmnet.engine.experiment_matrix` (config and plan),
:mod:`~lmnet.engine.experiment_state` (what the run folders hold, locks, step times),
:mod:`~lmnet.engine.experiment_tables` (tables and verdicts), :mod:`~lmnet.engine.figures`;
this module runs the matrix and re-exports their public names.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from lmnet._files import atomic_write_text
from lmnet.engine.experiment_matrix import ExperimentConfig, Run, load_experiment, plan_runs
from lmnet.engine.experiment_state import (
    add_used_seconds,
    cached_step_seconds,
    check_recipes,
    estimate_seconds,
    eval_dir,
    log_rows,
    run_lock,
    run_status,
    training_elsewhere,
    used_seconds,
)
from lmnet.engine.experiment_tables import verdict, write_tables
from lmnet.engine.figures import write_figures
from lmnet.run_folder import RunFolder

__all__ = ["ExperimentConfig", "Run", "load_experiment", "plan_runs", "run_status", "used_seconds",
           "run_experiment", "write_tables", "write_figures", "verdict"]

log = logging.getLogger(__name__)


def run_experiment(cfg: ExperimentConfig, data: str | None = None, dry_run: bool = False,
                   progress: bool = True, echo: Callable[[str], None] | None = None,
                   time_budget: float | None = None,
                   after_run: Callable[[dict[str, Any]], None] | None = None
                   ) -> list[dict[str, Any]]:
    """Train and evaluate every run not done yet, rewriting the tables after each; returns the
    plan (one dict per run: label, seed, fold, run folder, status, estimated seconds).

    ``dry_run``: only report the plan and the estimated time (a training step of each model is
    timed at each training size, so the estimate is for this machine, now).
    ``time_budget``: minutes of wall-clock for this call (a session's share of a long matrix); the
    run in progress when it ends is saved where it stands and the call returns; the same command
    later resumes it. Separate from the config's ``budget_minutes`` (each run's own cap).
    ``echo``: where the plan and progress lines go (default: this module's logger).
    ``after_run``: called with a run's plan entry once it is trained, evaluated and tabulated.
    """
    if time_budget is not None and time_budget <= 0:
        raise ValueError(f"time_budget must be > 0 minutes, got {time_budget}")
    echo = echo or log.info
    from lmnet.data.layouts import discover
    from lmnet.engine.train import run_split, step_memory, step_seconds
    from lmnet.runtime import available_memory

    runs = plan_runs(cfg, data)
    check_recipes(runs, cfg.budget_minutes)
    first = runs[0].config
    _, samples, _ = discover(first.data, first.format)
    n_train = len(run_split(first, samples)["train"])  # the split training will draw
    statuses = [run_status(r, cfg) for r in runs]
    steps: dict[str, float] = {}
    busy = training_elsewhere(runs)
    if busy is not None:
        echo(f"process {busy[0]} is training {busy[1]}: a step timed now runs beside it, so the "
             "estimate of a model not timed before is too high, and its time is not kept")
    free = available_memory()
    too_big: list[str] = []
    for run, status in zip(runs, statuses):
        if status in ("new", "partial") and not any(k.startswith(f"{run.label}@") for k in steps):
            sizes = sorted({run.config.train_size(e) for e in range(run.config.epochs)})
            c = run.config
            need = step_memory(c, sizes[-1])  # one image's forward pass: nothing trained
            if free is not None and need > 0.9 * free:
                micro = c.batch_size // c.grad_accum
                fits = max(1, int(micro * 0.9 * free / need))
                accum = next((a for a in range(c.grad_accum, c.batch_size + 1)
                              if c.batch_size % a == 0 and c.batch_size // a <= fits), c.batch_size)
                too_big.append(f"{run.label} at {sizes[-1]} px needs about {need / 2**30:.1f} GiB "
                               f"for a micro-batch of {micro}, and {free / 2**30:.1f} GiB are "
                               f"available: set grad_accum: {accum} (micro-batches of "
                               f"{c.batch_size // accum}; the same mathematics but for batch norm)")
            # a dry run times micro-batches of 2 images and scales: never a full micro-batch's memory
            probe = 2 if dry_run or need > 0.9 * (free or need) else None
            measure = (lambda cfg_, size_, p=probe: step_seconds(cfg_, size_, probe_batch=p))
            steps.update({f"{run.label}@{s}": cached_step_seconds(
                run, s, measure, keep=busy is None) for s in sizes})
    plan = [{"label": r.label, "seed": r.seed, "fold": r.fold, "run": str(r.run_dir), "status": s,
             "estimated_seconds": 0.0 if s in ("done", "trained") else estimate_seconds(r, n_train, steps)}
            for r, s in zip(runs, statuses)]
    total = sum(p["estimated_seconds"] for p in plan)
    echo(f"experiment {cfg.name}: {len(runs)} runs ({sum(s == 'done' for s in statuses)} done, "
         f"{sum(s == 'partial' for s in statuses)} cut short, {sum(s == 'new' for s in statuses)} "
         f"new); estimated {total / 3600:.1f} h of training on this machine")
    for p in plan:
        echo(f"  {p['label']:<24} seed {p['seed']}" + (f" fold {p['fold']}" if p["fold"] is not None else "")
             + f"  {p['status']:<8} ~{p['estimated_seconds'] / 60:.0f} min  {p['run']}")
    for line in too_big:
        echo(f"  would not fit in this machine's memory: {line}")
    if dry_run:
        return plan
    if too_big:
        raise ValueError(f"{len(too_big)} model(s) of the plan would not fit in this machine's "
                         f"memory (see above), e.g. {too_big[0]}")

    from lmnet.engine.evaluate import evaluate_run
    from lmnet.engine.train import CLEAR, train

    out = Path(cfg.out) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "experiment.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    started, left = time.perf_counter(), total
    deadline = started + time_budget * 60 if time_budget is not None else None
    for i, (run, p) in enumerate(zip(runs, plan), 1):
        if p["status"] == "done":
            continue
        elapsed = time.perf_counter() - started
        if deadline is not None and time.perf_counter() >= deadline:
            todo = sum(q["status"] != "done" for q in plan)
            echo(f"this call's time budget of {time_budget:g} min is spent; {todo} run(s) left: "
                 "the same command goes on from here")
            break
        echo(f"[run {i}/{len(runs)}] {run.label} seed {run.seed}: {p['status']}; matrix ETA "
             f"{max(left, 0) / 60:.0f} min (elapsed {elapsed / 60:.0f} min)")
        t0 = time.perf_counter()
        with run_lock(run.run_dir) as holder:
            if holder is not None:
                echo(f"  {run.label} seed {run.seed}: running in another process (pid {holder}); "
                     "skipped here")
                continue
            if run_status(run, cfg) in ("new", "partial"):  # (another process may have done it)
                budget = None
                if cfg.budget_minutes is not None:  # what is left of the run's own budget
                    budget = max(cfg.budget_minutes - used_seconds(run) / 60, 1e-3)
                if deadline is not None:  # ... or of this call's, if less
                    call_left = max((deadline - time.perf_counter()) / 60, 1e-3)
                    budget = call_left if budget is None else min(budget, call_left)
                t_train = time.perf_counter()
                try:
                    train(run.config.replace(time_budget=budget),
                          resume=RunFolder(run.run_dir).last.is_file(),
                          progress=progress,  # (no budget: clear one an earlier call left)
                          overrides={"time_budget": CLEAR if budget is None else budget})
                finally:  # an interrupted call counts too
                    add_used_seconds(run, cfg, time.perf_counter() - t_train)
            if run_status(run, cfg) == "trained":  # its best checkpoint (or last, if no epoch ended)
                if len(log_rows(run)) < run.config.epochs:
                    echo(f"  {run.label} seed {run.seed}: its {cfg.budget_minutes:g}-minute budget "
                         f"ended after {len(log_rows(run))} of {run.config.epochs} epochs")
                evaluate_run(run.run_dir, split=cfg.split, grid=cfg.grid, out=eval_dir(run, cfg),
                             progress=False)
        left -= max(p["estimated_seconds"], time.perf_counter() - t0)
        p["status"] = run_status(run, cfg)
        write_tables(cfg, data)
        if after_run is not None:
            after_run(p)
    write_tables(cfg, data)
    write_figures(cfg, data)
    return plan
