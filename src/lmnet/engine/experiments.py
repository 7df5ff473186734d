"""``lmnet experiment``: a matrix of models x seeds (or folds) trained and evaluated with one recipe
and budget, and the tables of whatever has finished.

A config (YAML) names one dataset, one recipe (any :class:`~lmnet.config.TrainConfig` key), a
budget per run, the models (registered names, or labelled variants with options) and the seeds;
``settings`` holds named alternatives of the recipe (``--setting gpu``: the paper's full recipe).
Each run is an ordinary run folder of ``lmnet train`` under ``<out>/<name>/runs/``, evaluated with
``lmnet evaluate``'s code. A run that is complete and evaluated is skipped, a run cut short is
resumed, and the tables are rewritten after every run from the runs that have finished.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lmnet._dataclass import dataclass_from_dict
from lmnet._files import atomic_save, atomic_write_text
from lmnet.config import TrainConfig, read_yaml_mapping
from lmnet.metrics.evaluator import mean_std
from lmnet.run_folder import RunFolder

__all__ = ["ExperimentConfig", "Run", "load_experiment", "plan_runs", "run_status", "used_seconds",
           "run_experiment", "write_tables", "write_figures", "verdict", "TABLE_COLUMNS",
           "VERDICT_METRICS"]

#: Columns of the tables, in the paper's order, per metric convention:
#: (header, key in an evaluation summary, scale to display).
TABLE_COLUMNS: dict[str, tuple[tuple[str, str, float], ...]] = {
    "paper": (("Accuracy", "accuracy_pooled", 100.0), ("Precision", "precision_pooled", 100.0),
              ("Recall", "recall_pooled", 100.0), ("mDice", "paper_mdice", 100.0),
              ("mIoU", "paper_miou", 100.0), ("Hd", "hd_mean", 1.0),
              ("RAD", "rad_pooled_percent", 1.0)),
    "foreground": (("Accuracy", "accuracy_pooled", 100.0), ("Precision", "precision_pooled", 100.0),
                   ("Recall", "recall_pooled", 100.0), ("Dice (fg)", "fg_dice_mean", 100.0),
                   ("IoU (fg)", "fg_iou_mean", 100.0), ("HD95", "hd95_mean", 1.0),
                   ("RAD", "rad_pooled_percent", 1.0)),
}
_NOTES = {
    "paper": "mDice / mIoU: mean over background and lesion of Dice / IoU pooled over the test set "
             "(the paper's convention). Accuracy, Precision, Recall: lesion, pooled. Hd: Hausdorff "
             "distance, mean over images, pixels at the evaluation size. RAD: relative area "
             "difference, pooled, signed, percent.",
    "foreground": "Dice / IoU (fg): lesion only, mean over images (the polyp literature's "
                  "convention). HD95: 95th-percentile Hausdorff distance, mean over images, "
                  "pixels at the evaluation size. Other columns as in the paper-convention table.",
}


@dataclass
class ExperimentConfig:
    """A matrix of runs; YAML keys are these fields."""

    name: str                                  # results go to <out>/<name>/
    data: str = ""                             # dataset folder, as downloaded
    models: list[Any] = field(default_factory=lambda: ["lmnet"])  # names or {label, model,
    #                                           model_args, recipe}: a row's own recipe keys
    seeds: list[int] = field(default_factory=lambda: [0])  # one run per model and seed (or fold)
    folds: int = 0                             # >= 2: k-fold cross-validation, every fold a run
    recipe: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys shared by every run
    budget_minutes: float | None = None        # wall-clock cap per run (the recipe fixes epochs)
    split: str = "test"                        # the split the tables report
    grid: str = "resized"                      # resized (the paper's) or original image size
    settings: dict[str, Any] = field(default_factory=dict)  # named alternatives of the recipe
    out: str = "results/experiments"           # parent folder of <name>/
    caption: str = ""                          # what the table is (the paper's table number ...)
    runs: str = ""                             # shared folder of run folders (default <out>/<name>/runs)
    reference: str = ""                        # label the verdict compares with every other row
                                               # (default: the row of the plain ``lmnet`` model)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")
        if not self.models or not self.seeds:
            raise ValueError("an experiment needs at least one model and one seed")
        if self.folds == 1 or self.folds < 0:
            raise ValueError(f"folds must be 0 (hold-out) or >= 2, got {self.folds}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise ValueError(f"budget_minutes must be > 0, got {self.budget_minutes}")
        for key, setting in self.settings.items():
            if not isinstance(setting, dict):
                raise ValueError(f"settings: {key!r} must be a mapping of recipe keys to values, "
                                 f"got {setting!r}")
        train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
        bad = [k for k in self.recipe if k not in train_keys]
        if bad:
            raise ValueError(f"recipe: unknown TrainConfig key(s) {bad}")
        for m in self.models:
            if not isinstance(m, (str, dict)) or (isinstance(m, dict) and "model" not in m):
                raise ValueError(f"a model is a registered name or a mapping with 'model' "
                                 f"(and 'label', 'model_args', 'recipe'), got {m!r}")
            own = m.get("recipe", {}) if isinstance(m, dict) else {}
            if not isinstance(own, dict):
                raise ValueError(f"a model's recipe is a mapping of TrainConfig keys, got {own!r}")
            bad = [k for k in own if k in _RUN_KEYS or k not in train_keys]
            if bad:
                raise ValueError(f"model {m['model']!r}: recipe key(s) {bad} are not TrainConfig "
                                 f"keys a row may change (not {sorted(_RUN_KEYS)})")
        if self.reference and self.reference not in [e.label for e in _model_entries(self)]:
            raise ValueError(f"reference {self.reference!r} is not a model label of this experiment")


@dataclass(frozen=True)
class Run:
    """One cell of the matrix."""

    label: str                                 # the model's row in the tables
    seed: int
    fold: int | None
    config: TrainConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out) / str(self.config.name)


def load_experiment(path: str | Path, setting: str | None = None) -> ExperimentConfig:
    """Read an experiment YAML; ``setting`` applies ``settings[setting]`` (recipe keys, and
    ``budget_minutes``, ``seeds``, ``out`` ...) on top."""
    p = Path(path)
    values = read_yaml_mapping(p, "experiment config")
    cfg = dataclass_from_dict(ExperimentConfig, values, "experiment key(s)")
    if setting is not None:
        if setting not in cfg.settings:
            raise ValueError(f"{p} has no setting {setting!r}; it has {sorted(cfg.settings) or 'none'}")
        top = {f.name for f in dataclasses.fields(ExperimentConfig)}
        change = dict(cfg.settings[setting])
        recipe = {**cfg.recipe, **{k: v for k, v in change.items() if k not in top}}
        own = {k: v for k, v in change.items() if k in top}
        runs = own.get("runs", f"{cfg.runs}_{setting}" if cfg.runs else "")
        cfg = dataclass_from_dict(ExperimentConfig, {**dataclasses.asdict(cfg), **own,
                                                     "recipe": recipe, "runs": runs, "name": own.get(
                                                         "name", f"{cfg.name}_{setting}")},
                                  "experiment key(s)")
    return cfg


#: Keys the runner sets for every run; a row's own ``recipe`` may not change them.
_RUN_KEYS = frozenset({"data", "model", "model_args", "seed", "out", "name", "time_budget",
                       "kfold", "fold"})


@dataclass(frozen=True)
class _Entry:
    """A row of the tables: its label, model, model options and own recipe keys."""

    label: str
    model: str
    model_args: dict[str, Any]
    recipe: dict[str, Any]


def _model_entries(cfg: ExperimentConfig) -> list[_Entry]:
    out = []
    for m in cfg.models:
        if isinstance(m, str):
            out.append(_Entry(m, m, {}, {}))
        else:
            out.append(_Entry(str(m.get("label", m["model"])), m["model"],
                              dict(m.get("model_args", {})), dict(m.get("recipe", {}))))
    labels = [_slug(e.label) for e in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must differ (as folder names), got {labels}")
    return out


def _slug(label: str) -> str:
    """A label as a folder name: ``+ LFT + GFT (LM-Net)`` -> ``LFT_GFT_LM-Net``."""
    return re.sub(r"[^\w.-]+", "_", label).strip("_") or "model"


def _shared_name(model: str, model_args: dict[str, Any], recipe: dict[str, Any] | None = None) -> str:
    """A run's folder name in a shared ``runs`` folder: the model and a digest of its options
    (and of the row's own recipe keys, where it has any)."""
    import hashlib

    name = model
    for part in (model_args, {"recipe": recipe} if recipe else {}):
        if part:
            name += "_" + hashlib.sha1(json.dumps(part, sort_keys=True).encode()).hexdigest()[:8]
    return name


def plan_runs(cfg: ExperimentConfig, data: str | None = None) -> list[Run]:
    """Every run of the matrix, in order: models, then seeds, then folds.

    Run folders go to ``<out>/<name>/runs/<label>_s<seed>``, or with ``runs`` set to
    ``<runs>/<model>[_<options digest>]_s<seed>``: experiments that name the same ``runs`` folder
    share the runs they have in common (same model, options, seed and recipe, checked by
    :func:`check_recipes`), so a model in two tables trains once.
    """
    runs = []
    root = Path(cfg.runs) if cfg.runs else Path(cfg.out) / cfg.name / "runs"
    for e in _model_entries(cfg):
        for seed in cfg.seeds:
            for fold in (range(cfg.folds) if cfg.folds else [None]):
                base = _shared_name(e.model, e.model_args, e.recipe) if cfg.runs else _slug(e.label)
                name = f"{base}_s{seed}" + (f"_fold{fold}" if fold is not None else "")
                values = {**cfg.recipe, **e.recipe,
                          "data": data or cfg.data or cfg.recipe.get("data", ""),
                          "model": e.model, "model_args": {**cfg.recipe.get("model_args", {}),
                                                           **e.model_args},
                          "seed": seed, "out": str(root), "name": name,
                          "time_budget": cfg.budget_minutes}
                if fold is not None:
                    values.update(kfold=cfg.folds, fold=fold)
                runs.append(Run(e.label, seed, fold, TrainConfig.from_dict(values)))
    return runs


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
        held_budget = _budget_record(run).get("budget_minutes", "unrecorded")
        if held_budget != "unrecorded" and held_budget != budget_minutes:
            differ.append(f"budget_minutes {held_budget!r} there, {budget_minutes!r} here")
        if differ:
            raise ValueError(f"{run.run_dir} holds a run of another recipe ({'; '.join(differ[:3])}"
                             f"{'; ...' if len(differ) > 3 else ''}): give this experiment its own "
                             "'runs' folder, or move that run away")


def _eval_dir(run: Run, cfg: ExperimentConfig) -> Path:
    return run.run_dir / f"eval_{cfg.split}_{cfg.grid}"


def _log_rows(run: Run) -> list[dict[str, str]]:
    from lmnet.engine.train import read_log

    return read_log(run.run_dir)


def _budget_file(run: Run) -> Path:
    return run.run_dir / "budget.json"


def _budget_record(run: Run) -> dict[str, Any]:
    """What the runner has recorded of the run's budget: ``budget_minutes`` (the cap it was
    trained under) and ``seconds`` (wall-clock of its ``train`` calls, validation included)."""
    try:
        return json.loads(_budget_file(run).read_text())
    except (OSError, ValueError):
        return {}


def _add_used_seconds(run: Run, cfg: ExperimentConfig, seconds: float) -> None:
    record = _budget_record(run)
    record = {"budget_minutes": cfg.budget_minutes,
              "seconds": round(float(record.get("seconds", 0.0)) + seconds, 1)}
    atomic_write_text(_budget_file(run), json.dumps(record) + "\n")


def used_seconds(run: Run) -> float:
    """Wall-clock seconds the run has spent training, as its budget counts them: the runner's
    record of its ``train`` calls (validation included, as ``train``'s own budget check counts);
    for a run trained outside the runner, its logged epochs and the steps of a cut epoch."""
    record = _budget_record(run)
    if "seconds" in record:
        return float(record["seconds"])
    spent = sum(float(r["epoch_seconds"]) for r in _log_rows(run))
    last = RunFolder(run.run_dir).last
    if last.is_file():
        from lmnet.deploy.checkpoint import load_checkpoint

        partial = load_checkpoint(last).get("partial")
        spent += float(partial["seconds"]) if partial else 0.0
    return spent


def _finished(run: Run, cfg: ExperimentConfig) -> bool:
    """All epochs trained, or the run's wall-clock budget spent (its schedule then unfinished)."""
    if len(_log_rows(run)) >= run.config.epochs:
        return True
    return cfg.budget_minutes is not None and used_seconds(run) >= cfg.budget_minutes * 60


def run_status(run: Run, cfg: ExperimentConfig) -> str:
    """``done`` (trained and evaluated), ``trained``, ``partial`` (cut short) or ``new``."""
    trained = _finished(run, cfg)
    if trained and (_eval_dir(run, cfg) / "metrics.json").is_file():
        return "done"
    if trained:
        return "trained"
    return "partial" if RunFolder(run.run_dir).last.is_file() else "new"


def _estimate_seconds(run: Run, n_train: int, step_times: dict[str, float]) -> float:
    """Training time of the epochs left, from a measured step time of this model and size."""
    cfg = run.config
    done = len(_log_rows(run))
    per_epoch = 0.0
    for epoch in range(done, cfg.epochs):
        size = cfg.train_size(epoch)
        per_epoch += math.ceil(n_train / cfg.batch_size) * step_times[f"{run.label}@{size}"]
    estimate = 1.15 * per_epoch  # data loading and validation
    if cfg.time_budget:
        estimate = min(estimate, max(0.0, cfg.time_budget * 60 - used_seconds(run)))
    return estimate


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[int | None]:
    """Hold ``run_dir/.lock`` while this process trains or evaluates the run; yields None, or the
    process id of another live process that holds it (the run is then left to that process). A
    lock left by a process that died is taken over."""
    import os

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
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


def _training_elsewhere(runs: list[Run]) -> tuple[int, Path] | None:
    """``(pid, run folder)`` of a live process other than this one that holds the lock of a run
    in the runs folders of ``runs`` (another matrix training there), else None."""
    for root in dict.fromkeys(r.run_dir.parent for r in runs):
        for lock in sorted(root.glob("*/.lock")):
            pid = _lock_holder(lock)
            if pid is not None:
                return pid, lock.parent
    return None


def _lock_holder(lock: Path) -> int | None:
    """The process id in a run's ``.lock`` if it is a live process other than this one."""
    import os

    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and pid != os.getpid() and _alive(pid) else None


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cached_step_seconds(run: Run, size: int, measure: Any, keep: bool = True) -> float:
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


def run_experiment(cfg: ExperimentConfig, data: str | None = None, dry_run: bool = False,
                   progress: bool = True, echo: Any = print,
                   time_budget: float | None = None) -> list[dict[str, Any]]:
    """Train and evaluate every run not done yet, rewriting the tables after each; returns the
    plan (one dict per run: label, seed, fold, run folder, status, estimated seconds).

    ``dry_run``: only report the plan and the estimated time (a training step of each model is
    timed at each training size, so the estimate is for this machine, now).
    ``time_budget``: minutes of wall-clock for this call (a session's share of a long matrix); the
    run in progress when it ends is saved where it stands and the call returns; the same command
    later resumes it. Separate from the config's ``budget_minutes`` (each run's own cap).
    """
    if time_budget is not None and time_budget <= 0:
        raise ValueError(f"time_budget must be > 0 minutes, got {time_budget}")
    from lmnet.data.layouts import discover
    from lmnet.data.splits import make_kfold_split, make_split
    from lmnet.engine.train import step_memory, step_seconds
    from lmnet.runtime import available_memory

    runs = plan_runs(cfg, data)
    check_recipes(runs, cfg.budget_minutes)
    first = runs[0].config
    _, samples, _ = discover(first.data, first.format)
    split = (make_kfold_split(samples, cfg.folds, 0, first.split_rng_seed,
                              val_ratio=first.split_ratios[1])
             if cfg.folds else make_split(samples, first.split_ratios, first.split_rng_seed))
    n_train = len(split["train"])
    statuses = [run_status(r, cfg) for r in runs]
    steps: dict[str, float] = {}
    busy = _training_elsewhere(runs)
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
            steps.update({f"{run.label}@{s}": _cached_step_seconds(
                run, s, measure, keep=busy is None) for s in sizes})
    plan = [{"label": r.label, "seed": r.seed, "fold": r.fold, "run": str(r.run_dir), "status": s,
             "estimated_seconds": 0.0 if s in ("done", "trained") else _estimate_seconds(r, n_train, steps)}
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
        with _run_lock(run.run_dir) as holder:
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
                    _add_used_seconds(run, cfg, time.perf_counter() - t_train)
            if run_status(run, cfg) == "trained":  # its best checkpoint (or last, if no epoch ended)
                if len(_log_rows(run)) < run.config.epochs:
                    echo(f"  {run.label} seed {run.seed}: its {cfg.budget_minutes:g}-minute budget "
                         f"ended after {len(_log_rows(run))} of {run.config.epochs} epochs")
                evaluate_run(run.run_dir, split=cfg.split, grid=cfg.grid, out=_eval_dir(run, cfg),
                             progress=False)
        left -= max(p["estimated_seconds"], time.perf_counter() - t0)
        p["status"] = run_status(run, cfg)
        write_tables(cfg, data)
    write_tables(cfg, data)
    write_figures(cfg, data)
    return plan


def _cell(values: list[float | None], scale: float) -> str:
    mean, std = mean_std(v for v in values if v is not None)
    if mean is None:
        return "n/a"
    return f"{mean * scale:.2f}" + ("" if std is None else f" ± {std * scale:.2f}")


def _model_size(run: Run) -> tuple[float, float]:
    """Deployed parameters (M) and MACs (G) at the run's image size."""
    from lmnet.deploy.checkpoint import build_model
    from lmnet.models._size import size_report

    rep = size_report(build_model(run.config), run.label, run.config.image_size,
                      run.config.in_channels)
    return rep.params_deployed / 1e6, rep.macs_deployed / 1e9


def _epochs_cell(trained: list[int], planned: int) -> str:
    """``8 of 8`` when every run of a row trained as many epochs, else ``4, 5 of 8``."""
    if not trained:
        return "n/a"
    per_run = str(trained[0]) if len(set(trained)) == 1 else ", ".join(map(str, trained))
    return f"{per_run} of {planned}"


def write_tables(cfg: ExperimentConfig, data: str | None = None) -> dict[str, Path]:
    """Markdown and CSV tables (mean ± std over seeds / folds, both conventions, subgroups) from
    the evaluated runs; rows for models with no finished run say so. Returns the files written."""
    from lmnet.engine.train import read_sessions

    runs = plan_runs(cfg, data)
    out = Path(cfg.out) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    spent: dict[str, list[tuple[int, float]]] = {}  # label -> (epochs trained, minutes) per done run
    ledger = []
    for run in runs:
        path = _eval_dir(run, cfg) / "metrics.json"
        results.setdefault(run.label, [])
        spent.setdefault(run.label, [])
        status = run_status(run, cfg)
        epochs, minutes = len(_log_rows(run)), used_seconds(run) / 60
        if path.is_file() and status == "done":
            results[run.label].append(json.loads(path.read_text()))
            spent[run.label].append((epochs, minutes))
        env = RunFolder(run.run_dir).read_env()
        commits = list(dict.fromkeys(str(s.get("git_commit") or "")[:7] or "unknown"
                                     for s in read_sessions(run.run_dir)))
        ledger.append([run.label, str(run.seed), "" if run.fold is None else str(run.fold), status,
                       f"{epochs}/{run.config.epochs}", f"{minutes:.1f}",
                       "yes" if status in ("done", "trained") and epochs < run.config.epochs else "",
                       str(env.get("threads", "")), str(env.get("cpu", "")), " ".join(commits),
                       str(run.run_dir)])
    sizes = {}
    for run in runs:
        if run.label not in sizes:
            sizes[run.label] = _model_size(run)
    entries = _model_entries(cfg)
    shared = {e.label for e in entries if not e.recipe}  # the caption states their recipe
    first = next((run.config for run in runs if run.label in shared), runs[0].config)
    planned = {run.label: run.config.epochs for run in runs}
    caption = (f"{cfg.caption + ' ' if cfg.caption else ''}Test split of {Path(first.data).name}, "
               f"{first.image_size} x {first.image_size}, {first.epochs} epochs"
               + (f" (first {first.progressive_epochs} at {first.progressive_size})"
                  if first.progressive_epochs else "")
               + (f", at most {cfg.budget_minutes:g} min per run" if cfg.budget_minutes else "")
               + f", batch {first.batch_size}, lr {first.lr}; mean ± std over "
               + (f"{cfg.folds} folds x " if cfg.folds else "") + f"seeds {cfg.seeds}. "
               f"MACs at {first.image_size} x {first.image_size}, deployed model.")
    own = [f"{e.label}: " + ", ".join(f"{k} {v}" for k, v in e.recipe.items())
           for e in entries if e.recipe]
    if own:
        caption += " Rows with their own recipe keys: " + "; ".join(own) + "."
    caption += (" Epochs: trained of planned, per run where the runs differ (`4, 5 of 8`), fewer "
                "than planned where the wall-clock budget ended the "
                "run (its schedule unfinished); Min/run: wall-clock minutes of training and "
                "validation per run (`runs.csv` lists every run, its threads, CPU and commits).")
    written = {"runs_csv": _write_csv(out / "runs.csv", ["Model", "Seed", "Fold", "Status", "Epochs",
                                                         "Minutes", "Cut by budget", "Threads",
                                                         "CPU", "Commits", "Run folder"],
                                                        ledger)}
    groups = sorted({g for rs in results.values() for r in rs for g in r.get("groups", {})})
    for conv, columns in TABLE_COLUMNS.items():
        header = ["Model", "Runs", "Epochs", "Min/run", *(h for h, _, _ in columns), "MACs (G)",
                  "Params (M)"]
        rows = []
        for label, rs in results.items():
            cells = [_cell([r["all"].get(k) for r in rs], s) for _, k, s in columns]
            params, macs = sizes[label]
            epochs = _epochs_cell([e for e, _ in spent[label]], planned[label])
            minutes = (f"{sum(m for _, m in spent[label]) / len(spent[label]):.0f}"
                       if spent[label] else "n/a")
            rows.append([label, str(len(rs)), epochs, minutes, *cells, f"{macs:.2f}", f"{params:.2f}"])
        written[f"{conv}_md"] = _write_md(out / f"table_{conv}.md", header, rows,
                                          caption + " " + _NOTES[conv])
        written[f"{conv}_csv"] = _write_csv(out / f"table_{conv}.csv", header, rows)
        if groups:
            gheader = ["Subgroup", "Model", "Runs", *(h for h, _, _ in columns)]
            grows = []
            for g in groups:
                for label, rs in results.items():
                    have = [r["groups"][g] for r in rs if g in r.get("groups", {})]
                    grows.append([g, label, str(len(have)),
                                  *(_cell([h.get(k) for h in have], s) for _, k, s in columns)])
            written[f"{conv}_groups_md"] = _write_md(out / f"table_{conv}_subgroups.md", gheader,
                                                     grows, caption + " Per subgroup. " + _NOTES[conv])
            written[f"{conv}_groups_csv"] = _write_csv(out / f"table_{conv}_subgroups.csv", gheader,
                                                       grows)
    written.update(_write_verdict(cfg, out, results, sizes, caption))
    return written


#: What the verdict compares: (header, key in an evaluation summary, scale, higher is better).
VERDICT_METRICS: tuple[tuple[str, str, float, bool], ...] = (
    ("mDice", "paper_mdice", 100.0, True), ("mIoU", "paper_miou", 100.0, True),
    ("Dice (fg)", "fg_dice_mean", 100.0, True), ("IoU (fg)", "fg_iou_mean", 100.0, True),
    ("HD95", "hd95_mean", 1.0, False))


def verdict(ref: list[float], other: list[float], higher_is_better: bool = True) -> str:
    """``wins``, ``ties`` or ``loses`` (with the difference of the means, reference minus other)
    when both rows have two or more runs: a tie is a difference within the sum of the two rows'
    sample standard deviations over seeds. With a single run on either side there is no spread to
    judge by: ``ahead (1 run)`` / ``behind (1 run)``. ``n/a`` without runs."""
    (m_ref, s_ref), (m_other, s_other) = mean_std(ref), mean_std(other)
    if m_ref is None or m_other is None:
        return "n/a"
    diff = m_ref - m_other
    better = diff if higher_is_better else -diff
    if s_ref is None or s_other is None:
        word = "ahead (1 run)" if better > 0 else "behind (1 run)" if better < 0 else "equal (1 run)"
    else:
        word = "ties" if abs(diff) <= s_ref + s_other else "wins" if better > 0 else "loses"
    return f"{word} {diff:+.2f}"


def _reference_label(cfg: ExperimentConfig) -> str | None:
    if cfg.reference:
        return cfg.reference
    plain = [e.label for e in _model_entries(cfg) if e.model == "lmnet" and not e.model_args
             and not e.recipe]
    return plain[0] if plain else None


def _judge(ref_parts: list[dict[str, Any]], parts: list[dict[str, Any]],
           counts: dict[str, dict[str, int]]) -> list[str]:
    """One verdict cell per :data:`VERDICT_METRICS` metric (the reference's summaries against
    another row's), tallied into ``counts`` (metric -> wins / ties / loses)."""
    cells = []
    for h, key, scale, higher in VERDICT_METRICS:
        cell = verdict([r[key] * scale for r in ref_parts if r.get(key) is not None],
                       [r[key] * scale for r in parts if r.get(key) is not None], higher)
        cells.append(cell)
        word = cell.split(" ")[0]
        if word in counts.setdefault(h, {"wins": 0, "ties": 0, "loses": 0}):
            counts[h][word] += 1
    return cells


def _write_verdict(cfg: ExperimentConfig, out: Path, results: dict[str, list[dict[str, Any]]],
                   sizes: dict[str, tuple[float, float]], caption: str) -> dict[str, Path]:
    """``verdict.md`` / ``.csv``: where the reference row (LM-Net) wins, ties or loses against
    every other row, metric by metric, from the same evaluated runs as the tables; with
    subgroups (BUSI's classes), ``verdict_subgroups.md`` / ``.csv`` the same per subgroup."""
    ref = _reference_label(cfg)
    if ref is None or len(results) < 2:
        return {}
    metrics = [h for h, _, _, _ in VERDICT_METRICS]
    header = ["Against", "Runs", *metrics, "MACs", "Params"]
    rows: list[list[str]] = []
    counts: dict[str, dict[str, int]] = {}
    for label, rs in results.items():
        if label == ref:
            continue
        cells = _judge([r["all"] for r in results[ref]], [r["all"] for r in rs], counts)
        (p_ref, m_ref), (p_other, m_other) = sizes[ref], sizes[label]
        rows.append([label, f"{len(results[ref])} / {len(rs)}", *cells,
                     f"{m_ref / m_other:.2f}x", f"{p_ref / p_other:.2f}x"])
    summary = [f"- {h}: {ref} wins against {c['wins']}, ties with {c['ties']}, loses against "
               f"{c['loses']} of the {len(rows)} other rows"
               + (f"; {len(rows) - sum(c.values())} not judged (fewer than two runs on a side)"
                  if sum(c.values()) < len(rows) else "") for h, c in counts.items()]
    note = (f"Where {ref} wins, ties or loses against every other row: difference of the means "
            f"({ref} minus the other row; HD95: lower is better). A tie is a difference within the "
            "sum of both rows' sample standard deviations over seeds; with one run on either side "
            "there is no spread to judge by (`ahead` / `behind (1 run)`). MACs, Params: "
            f"{ref}'s over the other row's. Runs: {ref}'s / the other row's. mDice, mIoU: the "
            "paper's convention; Dice, IoU (fg): lesion only, mean over images.")
    md = _write_md(out / "verdict.md", header, rows, caption + " " + note)
    md.write_text(md.read_text() + "\n" + "\n".join(summary) + "\n")
    written = {"verdict_md": md, "verdict_csv": _write_csv(out / "verdict.csv", header, rows)}
    groups = sorted({g for rs in results.values() for r in rs for g in r.get("groups", {})})
    if not groups:
        return written
    gheader = ["Subgroup", "Against", "Runs", *metrics]
    grows, gsummary = [], []
    for g in groups:
        ref_parts = [r["groups"][g] for r in results[ref] if g in r.get("groups", {})]
        gcounts: dict[str, dict[str, int]] = {}
        for label, rs in results.items():
            if label == ref:
                continue
            parts = [r["groups"][g] for r in rs if g in r.get("groups", {})]
            grows.append([g, label, f"{len(ref_parts)} / {len(parts)}",
                          *_judge(ref_parts, parts, gcounts)])
        tally = {w: sum(c[w] for c in gcounts.values()) for w in ("wins", "ties", "loses")}
        n = len(metrics) * (len(results) - 1)
        gsummary.append(f"- {g}: of {n} judgements (other rows x metrics) {ref} wins {tally['wins']}, "
                        f"ties {tally['ties']}, loses {tally['loses']}"
                        + (f", {n - sum(tally.values())} not judged" if sum(tally.values()) < n
                           else ""))
    gmd = _write_md(out / "verdict_subgroups.md", gheader, grows,
                    caption + " Per subgroup (the images of one class of the test split). " + note)
    gmd.write_text(gmd.read_text() + "\n" + "\n".join(gsummary) + "\n")
    written.update(verdict_subgroups_md=gmd,
                   verdict_subgroups_csv=_write_csv(out / "verdict_subgroups.csv", gheader, grows))
    return written


def write_figures(cfg: ExperimentConfig, data: str | None = None, n_images: int = 4
                  ) -> dict[str, Path]:
    """``curves.png`` (validation mDice per epoch, every model, seed band) and
    ``qualitative.png`` (``n_images`` test images, see :func:`figure_samples`; each model's first
    finished run), from whatever has finished. A run's predictions for the figure are kept in its folder
    (``figure_masks_<split>.npz``): with its logs and evaluation, a finished run's small files
    rebuild both tables and figures without its checkpoints. Returns the files written."""
    from lmnet.data.dataset import load_sample
    from lmnet.data.layouts import discover
    from lmnet.deploy.loading import load_model
    from lmnet.deploy.postprocess import predict_probabilities, probabilities_to_mask
    from lmnet.deploy.preprocess import preprocess
    from lmnet.engine.figures import plot_curves, plot_qualitative

    runs = plan_runs(cfg, data)
    out = Path(cfg.out) / cfg.name
    by_label: dict[str, list[Path]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run.run_dir)
    written = {}
    curves = plot_curves(by_label, out / "curves.png",
                         title=f"{cfg.caption} Validation mDice per epoch: mean over seeds, band = "
                               "lowest to highest run".strip())
    if curves:
        written["curves"] = curves
    finished = {}
    for run in runs:
        if run.label not in finished and run_status(run, cfg) == "done":
            finished[run.label] = run
    if not finished:
        return written
    first = next(iter(finished.values()))
    split = RunFolder(first.run_dir).read_split()
    _, samples, _ = discover(first.config.data, first.config.format)
    by_name = {s.name: s for s in samples}
    chosen = figure_samples([by_name[n] for n in sorted(split[cfg.split])], n_images)
    loaded = [load_sample(s, first.config.in_channels) for s in chosen]
    names = [s.name for s in chosen]
    preds = {}
    for label, run in finished.items():
        kept = run.run_dir / f"figure_masks_{cfg.split}.npz"  # the figure without the checkpoint
        best = RunFolder(run.run_dir).best
        stale = best.is_file() and kept.is_file() and best.stat().st_mtime > kept.stat().st_mtime
        masks = None if stale else _kept_masks(kept, names)
        if masks is None:
            model, tcfg = load_model(run.run_dir)
            x = preprocess([img for img, _ in loaded], tcfg.image_size, tcfg.mean, tcfg.std)
            masks = [probabilities_to_mask(predict_probabilities(model, x[i:i + 1],
                                                                 img.shape[:2]))[0]
                     for i, (img, _) in enumerate(loaded)]
            _keep_masks(kept, names, masks)
        preds[label] = masks
    written["qualitative"] = plot_qualitative([img for img, _ in loaded],
                                              [m.astype(bool) for _, m in loaded], preds,
                                              names, out / "qualitative.png")
    return written


def figure_samples(samples: list[Any], n: int) -> list[Any]:
    """The qualitative figure's images: the first ``n`` by name, or, where the samples have
    subgroups (BUSI's classes), the first of every subgroup in turn, so that each class shows."""
    by_group: dict[str, list[Any]] = {}
    for s in samples:
        by_group.setdefault(s.group or "", []).append(s)
    if len(by_group) < 2:
        return samples[:n]
    chosen: list[Any] = []
    for depth in range(max(len(v) for v in by_group.values())):
        for group in sorted(by_group):
            if depth < len(by_group[group]) and len(chosen) < n:
                chosen.append(by_group[group][depth])
    return chosen


def _kept_masks(path: Path, names: list[str]) -> list[Any] | None:
    """The predicted masks of ``names`` kept in ``path`` by :func:`_keep_masks`, else None."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as kept:
            if [str(n) for n in kept["names"]] != names:
                return None
            return [kept[f"mask{i}"] for i in range(len(names))]
    except (OSError, KeyError, ValueError):
        return None


def _keep_masks(path: Path, names: list[str], masks: list[Any]) -> None:
    """Keep a run's predicted masks of the figure's images beside its logs (a few kB), so that the
    figure can be drawn again from a run's small files alone (logs, evaluation, these masks)."""
    import numpy as np

    atomic_save(path, lambda tmp: np.savez_compressed(
        tmp, names=np.array(names), **{f"mask{i}": np.asarray(m, dtype=bool)
                                       for i, m in enumerate(masks)}))


def _write_md(path: Path, header: list[str], rows: list[list[str]], caption: str) -> Path:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    path.write_text("\n".join(lines) + "\n\n" + caption + "\n")
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path
