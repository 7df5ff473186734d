"""Starting a run from trained weights (``init_weights``): a warm restart of a model with a new
schedule, or fine-tuning a shipped model on one's own images.

The source is a shipped name (``kvasir``), a pretrained folder or Hub id (weights stored
re-parameterised: the run then trains that network, ``deployed_form``), or a run folder or
checkpoint of ``lmnet train`` (its own form; re-parameterised first where the config asks for
``deployed_form``). Its architecture must be the one the config trains; a difference is an
error that names it, raised before anything is written.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmnet.config import TrainConfig
from lmnet.deploy.checkpoint import (
    build_model,
    load_checkpoint,
    load_weights,
    model_from_checkpoint,
)
from lmnet.deploy.pretrained import from_pretrained, pretrained_train_config, resolve_pretrained
from lmnet.models._hub import CARD_NAME, is_pretrained_folder
from lmnet.run_folder import RunFolder

__all__ = ["InitialWeights", "initial_weights"]

log = logging.getLogger(__name__)

#: What must agree between the starting weights and the run (``model_args`` too, checked by
#: loading the weights into the run's own network).
_ARCHITECTURE = ("model", "in_channels", "n_classes")


@dataclass
class InitialWeights:
    """Weights a run starts from: ``state`` (fp32), in ``deployed`` form or not, the config they
    were trained with, and ``record`` (what ``init.json`` of the run keeps)."""

    source: str
    state: dict[str, torch.Tensor]
    deployed: bool
    config: TrainConfig
    record: dict[str, Any]


def _source_text(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source  # a folder from anywhere; names kept


def initial_weights(cfg: TrainConfig) -> InitialWeights:
    """Load ``cfg.init_weights`` (see the module's docstring) in the form the run trains."""
    source = _source_text(str(cfg.init_weights))
    path = Path(source)
    epochs_done = None
    card_lines: list[str] = []
    card_recipe: list[str] = []
    if path.exists() and not is_pretrained_folder(path):  # a run folder or checkpoint
        ckpt = load_checkpoint(path)
        src_cfg = TrainConfig.from_dict(ckpt["config"])
        deployed = cfg.deployed_form or src_cfg.deployed_form
        _check_fits(cfg, src_cfg, source)
        model, _ = model_from_checkpoint(path, deploy=deployed, channels_last=False)
        kind = "run of lmnet train"
        epochs_done = int(ckpt.get("epoch", -1)) + 1
        version = None
    else:  # a shipped name, a pretrained folder or a Hub id: stored re-parameterised
        model = from_pretrained(source, channels_last=False)
        src_cfg = pretrained_train_config(model)
        deployed = True
        _check_fits(cfg, src_cfg, source)
        kind = "pretrained model"
        version = model.pretrained_config.get("lmnet_version")
        card = resolve_pretrained(source) / CARD_NAME
        if card.is_file():  # its recipe, wall-clock and machine, for the card of the run
            text = card.read_text()
            card_lines = card_section(text, "Training time and machine")
            card_recipe = card_section(text, "Recipe")
    for name in ("mean", "std"):
        if list(getattr(src_cfg, name)) != list(getattr(cfg, name)):
            log.warning("note: init_weights %s were trained with %s %s; this run normalises with %s",
                        source, name, getattr(src_cfg, name), getattr(cfg, name))
    state = {k: v.detach().float() if v.is_floating_point() else v.detach()
             for k, v in model.state_dict().items()}
    try:  # the run's own network (model_args included) takes these weights
        load_weights(build_model(cfg.replace(deployed_form=deployed)), state, source)
    except ValueError as err:
        raise ValueError(f"init_weights {source} do not fit this run's network (model_args "
                         f"{cfg.model_args}; theirs: {src_cfg.model_args}): {err}") from None
    record = {"source": source, "kind": kind, "form": "deployed" if deployed else "training",
              "train_config": src_cfg.to_dict()}
    if epochs_done is not None:
        record["epochs_done"] = epochs_done
        log_rows = RunFolder(path if path.is_dir() else path.parent).read_log()
        if log_rows:
            record["last_logged_epoch"] = log_rows[-1]
    if version is not None:
        record["lmnet_version"] = version
    if card_lines:
        record["time_and_machine"] = card_lines
    if card_recipe:
        record["card_recipe"] = card_recipe
    return InitialWeights(source, state, deployed, src_cfg, record)


def card_section(text: str, heading: str) -> list[str]:
    """The bullet lines (without their ``- ``) of the ``## heading`` section of a model card."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == heading
        elif inside and line.startswith("- "):
            lines.append(line[2:].strip())
    return lines


def _check_fits(cfg: TrainConfig, src: TrainConfig, source: str) -> None:
    differ = [k for k in _ARCHITECTURE if getattr(cfg, k) != getattr(src, k)]
    if differ:
        said = ", ".join(f"{k} {getattr(src, k)!r} (this run: {getattr(cfg, k)!r})" for k in differ)
        raise ValueError(f"init_weights {source} do not fit this run: they are {said}; set "
                         f"{', '.join(differ)} to match them, or start from other weights")
