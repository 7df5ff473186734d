"""Training configuration: a dataclass with the paper's recipe as defaults, loaded from YAML."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmnet._dataclass import dataclass_from_dict
from lmnet._defaults import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["TrainConfig", "field_help", "load_config", "read_yaml_mapping"]


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults follow the LM-Net paper."""

    # data
    data: str = ""                      # dataset folder, as downloaded
    format: str | None = None           # kvasir | busi | lgg | cvc | generic; None = detect
    image_size: int = 256               # images are resized to image_size x image_size
    progressive_size: int = 0           # side of the first progressive_epochs epochs (0 = off)
    progressive_epochs: int = 0         # epochs at progressive_size; validation stays at image_size
    split_ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/val/test
    kfold: int = 0                      # 0 = hold-out split; k >= 2 = k-fold cross-validation
    fold: int = 0                       # which fold is the test set when kfold >= 2
    split_file: str | None = None       # reuse a saved split.json
    split_seed: int | None = None       # seed of the split (default: seed); fix it to compare seeds on one split
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # per channel, of image/255
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # per channel, of image/255
    num_workers: int = 0                # DataLoader worker processes
    # model
    model: str = "lmnet"                # registered name (lmnet list-models)
    model_args: dict[str, Any] = field(default_factory=dict)  # extra create_model arguments
    in_channels: int = 3                # image channels (1 = grey, 3 = RGB)
    n_classes: int = 2                  # 2 = softmax background/lesion, 1 = one sigmoid map
    init_weights: str | None = None     # start from trained weights: a shipped name (kvasir), a pretrained folder or Hub id, a run folder or checkpoint
    deployed_form: bool = False         # train the re-parameterised network (set by init_weights whose weights are stored re-parameterised)
    # optimisation
    epochs: int = 200                   # length of the cosine schedule
    batch_size: int = 32                # global batch (all processes together)
    grad_accum: int = 1                 # micro-batches per optimiser step (batch_size / grad_accum each)
    lr: float = 1e-3                    # AdamW learning rate
    weight_decay: float = 1e-4          # AdamW's decoupled weight decay
    min_lr: float = 0.0                 # end of the cosine annealing
    cb_beta: float = 0.9999             # class-balanced CE weights (Cui et al. 2019)
    dice_weight: float = 1.0            # weight of the soft Dice term (0 = cross-entropy only)
    # run
    seed: int = 0                       # split, initialisation and augmentation
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    amp: bool = True                    # mixed precision (fp16) on CUDA
    bf16: bool = False                  # bf16 autocast on CPU
    channels_last: bool = True          # channels-last memory format (faster on CPUs; lmnet's native kernels need it)
    time_budget: float | None = None    # minutes; stop (and save) after the step that exceeds it
    select_metric: str = "paper_mdice"  # validation metric that picks checkpoint_best.pt
    out: str = "runs"                   # parent folder of run folders
    name: str | None = None             # run folder name; default: <format>_<model>_s<seed>

    def __post_init__(self) -> None:
        self.validate()

    @property
    def split_rng_seed(self) -> int:
        """The seed that draws the split: ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value."""
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            bound = ">= 0" if allow_zero else "> 0"
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number {bound}, got {v!r}")
            if v < 0 or (v == 0 and not allow_zero):
                raise ValueError(f"{name} must be {bound}, got {v!r}")

        for n in ("image_size", "epochs", "batch_size", "grad_accum", "lr", "in_channels", "n_classes"):
            positive(n)
        for n in ("weight_decay", "min_lr", "dice_weight", "num_workers"):
            positive(n, allow_zero=True)
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {self.image_size}")
        for n in ("progressive_size", "progressive_epochs"):
            positive(n, allow_zero=True)
        if self.progressive_size % 16 or self.progressive_size > self.image_size:
            raise ValueError(f"progressive_size must be a multiple of 16 no larger than image_size "
                             f"{self.image_size}, got {self.progressive_size}")
        if bool(self.progressive_size) != bool(self.progressive_epochs):
            raise ValueError("progressive_size and progressive_epochs go together: set both or neither")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if not 0 < self.cb_beta < 1:
            raise ValueError(f"cb_beta must be in (0, 1), got {self.cb_beta}")
        if len(self.split_ratios) != 3 or min(self.split_ratios) < 0 or self.split_ratios[0] <= 0:
            raise ValueError(f"split_ratios must be three numbers [train, val, test], got {self.split_ratios}")
        if self.kfold == 1 or self.kfold < 0:
            raise ValueError(f"kfold must be 0 (hold-out) or >= 2, got {self.kfold}")
        if self.kfold and not 0 <= self.fold < self.kfold:
            raise ValueError(f"fold must be in 0..{self.kfold - 1}, got {self.fold}")
        if self.time_budget is not None and not (math.isfinite(self.time_budget)
                                                 and self.time_budget > 0):
            raise ValueError(f"time_budget must be > 0 minutes, got {self.time_budget}")
        if not isinstance(self.model_args, dict):
            raise ValueError(f"model_args must be a mapping, got {self.model_args!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                     and math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be a list of finite numbers, got {values!r}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0 for every channel (it divides the image), "
                             f"got {self.std}")

    def train_size(self, epoch: int) -> int:
        """The side training images have in 0-based ``epoch`` (progressive resizing)."""
        return self.progressive_size if epoch < self.progressive_epochs else self.image_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping; unknown keys raise ``ValueError`` naming the valid ones."""
        return dataclass_from_dict(cls, values, "config key(s)")

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def field_help(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's comment in the class source: the text of the CLI's ``--help``, written once,
    beside the field."""
    import inspect
    import re

    names = {f.name for f in dataclasses.fields(cls)}
    helps: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]*?(?:#\s*(.*))?$", line)
        if m and m.group(1) in names:
            helps[m.group(1)] = (m.group(2) or "").strip()
    return helps


def read_yaml_mapping(path: str | Path, what: str = "YAML file") -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: ``{}``); clear errors for a missing file, bad
    YAML or anything but a mapping."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no {what} at {p}")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{p} is not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{p} must hold a mapping of keys to values")
    return loaded


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file (if any), then ``overrides`` (``None`` values are ignored)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_yaml_mapping(path, "config file"))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig.from_dict(values)
