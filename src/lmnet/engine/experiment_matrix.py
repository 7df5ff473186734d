"""The matrix of ``lmnet experiment``: its config (one dataset, one recipe, a budget per run, the
models and the seeds or folds) and the runs it plans, each an ordinary ``lmnet train`` run folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmnet._dataclass import dataclass_from_dict
from lmnet.config import TrainConfig, read_yaml_mapping

__all__ = ["ExperimentConfig", "Run", "load_experiment", "plan_runs", "model_entries",
           "reference_label"]


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
        if self.reference and self.reference not in [e.label for e in model_entries(self)]:
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


def model_entries(cfg: ExperimentConfig) -> list[_Entry]:
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
    for e in model_entries(cfg):
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


def reference_label(cfg: ExperimentConfig) -> str | None:
    if cfg.reference:
        return cfg.reference
    plain = [e.label for e in model_entries(cfg) if e.model == "lmnet" and not e.model_args
             and not e.recipe]
    return plain[0] if plain else None
