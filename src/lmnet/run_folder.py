"""The run folder of ``lmnet train`` (after nnU-Net's output folders): the one place that knows its
file names, and reads and writes its small files.

A run folder holds ``config.json`` (the training config), ``split.json`` (the images of each part),
``env.json`` (versions, machine, git commit), ``log.csv`` (one row per epoch), ``sessions.jsonl``
(where and when each part of the run ran), ``init.json`` (the weights it started from, when
``init_weights`` named some), ``ddp.json`` (a multi-process run), ``checkpoint_last.pt`` (every epoch, and a cut epoch's
progress), ``checkpoint_best.pt`` (best validation score), TensorBoard events in ``tb/`` and
``eval_<split>_<grid>/`` from ``lmnet evaluate``; in a matrix of ``lmnet experiment`` also
``budget.json``, ``.lock`` and ``figure_masks_<split>.npz``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lmnet._files import atomic_write_text

__all__ = ["RunFolder"]


class RunFolder:
    """A run folder at ``path`` (which need not exist yet): its files' paths, and their reads and
    writes (JSON written whole, through :func:`~lmnet._files.atomic_write_text`)."""

    CONFIG = "config.json"
    SPLIT = "split.json"
    ENV = "env.json"
    LOG = "log.csv"
    SESSIONS = "sessions.jsonl"
    INIT = "init.json"
    DDP = "ddp.json"
    BUDGET = "budget.json"
    LOCK = ".lock"
    LAST = "checkpoint_last.pt"
    BEST = "checkpoint_best.pt"
    TENSORBOARD = "tb"
    #: Its small files besides the checkpoints: what a run's results are made of.
    RECORDS = (CONFIG, SPLIT, ENV, LOG, SESSIONS, INIT)
    #: Its checkpoints, in the order a model is taken from them (best first).
    CHECKPOINTS = (BEST, LAST)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- paths -------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def split(self) -> Path:
        return self.path / self.SPLIT

    @property
    def env(self) -> Path:
        return self.path / self.ENV

    @property
    def log(self) -> Path:
        return self.path / self.LOG

    @property
    def sessions(self) -> Path:
        return self.path / self.SESSIONS

    @property
    def init(self) -> Path:
        return self.path / self.INIT

    @property
    def budget(self) -> Path:
        """``budget.json``: the seconds ``lmnet experiment`` has spent on this run."""
        return self.path / self.BUDGET

    @property
    def lock(self) -> Path:
        """``.lock``: held by the process that trains or evaluates the run in a matrix."""
        return self.path / self.LOCK

    def eval_dir(self, split: str, grid: str, suffix: str = "") -> Path:
        """``eval_<split>_<grid><suffix>/``: what ``lmnet evaluate`` writes for this run."""
        return self.path / f"eval_{split}_{grid}{suffix}"

    def figure_masks(self, split: str) -> Path:
        """``figure_masks_<split>.npz``: the predicted masks of a matrix's qualitative figure."""
        return self.path / f"figure_masks_{split}.npz"

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    @property
    def best(self) -> Path:
        return self.path / self.BEST

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    # -- what it is ----------------------------------------------------------------------------
    @classmethod
    def holds_run(cls, path: str | Path) -> bool:
        """Whether ``path`` is a run folder: a checkpoint, or a config beside a log."""
        folder = Path(path)
        return folder.is_dir() and (any(folder.glob("checkpoint_*.pt"))
                                    or ((folder / cls.CONFIG).is_file() and (folder / cls.LOG).is_file()))

    def checkpoint(self) -> Path | None:
        """The checkpoint a model is taken from: the best, else the last; None if neither."""
        return next((self.path / n for n in self.CHECKPOINTS if (self.path / n).is_file()), None)

    # -- reads and writes ----------------------------------------------------------------------
    def _read(self, path: Path) -> dict[str, Any] | None:
        return json.loads(path.read_text()) if path.is_file() else None

    def _write(self, path: Path, data: dict[str, Any]) -> None:
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")

    def read_config(self) -> dict[str, Any] | None:
        """``config.json`` as a dict; None if there is none."""
        return self._read(self.config)

    def write_config(self, config: dict[str, Any]) -> None:
        self._write(self.config, config)

    def read_split(self) -> dict[str, Any] | None:
        """``split.json`` as a dict; None if there is none."""
        return self._read(self.split)

    def read_env(self) -> dict[str, Any]:
        """``env.json`` as a dict; empty if there is none."""
        return self._read(self.env) or {}

    def write_env(self, env: dict[str, Any]) -> None:
        self._write(self.env, env)

    def read_init(self) -> dict[str, Any] | None:
        """``init.json``: the weights the run started from and how they were trained; None for a
        run that started from a random initialisation."""
        return self._read(self.init)

    def write_init(self, init: dict[str, Any]) -> None:
        self._write(self.init, init)

    def write_ddp(self, record: dict[str, Any]) -> None:
        """``ddp.json``: how a multi-process run was spread and how far its replicas drifted."""
        self._write(self.path / self.DDP, record)

    def add_session(self, session: dict[str, Any]) -> None:
        """Append one line to ``sessions.jsonl``."""
        with self.sessions.open("a") as fh:
            fh.write(json.dumps(session) + "\n")

    def read_sessions(self) -> list[dict[str, Any]]:
        """The records of ``sessions.jsonl``: when, where and at which commit each part of the run
        ran (one per call of ``train`` on it); empty if there are none."""
        if not self.sessions.is_file():
            return []
        return [json.loads(line) for line in self.sessions.read_text().splitlines() if line.strip()]

    def read_log(self) -> list[dict[str, str]]:
        """The rows of ``log.csv`` (one per finished epoch; empty before the first)."""
        if not self.log.is_file():
            return []
        with self.log.open(newline="") as fh:
            return list(csv.DictReader(fh))
