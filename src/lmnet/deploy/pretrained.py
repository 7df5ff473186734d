"""Pretrained models: ``lmnet.from_pretrained`` for a name shipped with the package, a local folder,
or a Hugging Face Hub repository; and the pretrained folder of a trained run.

A pretrained folder (see :mod:`lmnet.models._hub`) never runs code when loaded: JSON and safetensors.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmnet._optional import require
from lmnet.config import TrainConfig
from lmnet.deploy.checkpoint import model_from_checkpoint, resolve_checkpoint
from lmnet.deploy.metadata import checkpoint_split
from lmnet.models._hub import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    default_pretrained_cfg,
    load_pretrained,
    save_pretrained,
)

__all__ = ["SHIPPED", "resolve_pretrained", "from_pretrained", "pretrained_train_config",
           "export_pretrained"]

#: Pretrained models inside the package: name -> folder under ``lmnet/pretrained/``.
SHIPPED = {"kvasir": "kvasir"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_pretrained(name_or_path: str | Path, revision: str | None = None) -> Path:
    """The local folder of a pretrained model.

    ``name_or_path`` is a shipped name (:data:`SHIPPED`), a folder, or a Hub repository id
    ``org/name`` (downloaded with ``huggingface_hub``, the ``hub`` extra, into its cache; a folder
    of that name wins over the Hub).
    """
    text = str(name_or_path)
    if text in SHIPPED:
        folder = Path(str(resources.files("lmnet") / "pretrained" / SHIPPED[text]))
        if not (folder / WEIGHTS_NAME).is_file():
            raise ValueError(f"the shipped model {text!r} is missing from this installation "
                             f"({folder}); reinstall lmnet")
        return folder
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; a pretrained model is a folder with {CONFIG_NAME} and "
                         f"{WEIGHTS_NAME} (give a checkpoint file or run folder as the positional "
                         "argument instead of --weights)")
    if _HUB_ID.match(text):
        hub = require("huggingface_hub", "hub")
        try:
            return Path(hub.snapshot_download(repo_id=text, revision=revision,
                                              allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME,
                                                                      "*.png"]))
        except Exception as err:  # noqa: BLE001 - network, missing repo, offline: one clear message
            raise ValueError(f"cannot get {text!r} from the Hugging Face Hub: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    raise ValueError(f"no pretrained model {text!r}: not a shipped name ({', '.join(SHIPPED)}), "
                     "not a folder, not a Hub id org/name")


def from_pretrained(name_or_path: str | Path, revision: str | None = None,
                    channels_last: bool = True) -> nn.Module:
    """A pretrained model, re-parameterised and in eval mode, ready for inference.

    ``lmnet.from_pretrained("kvasir")`` (shipped), ``lmnet.from_pretrained(PATH)`` or
    ``lmnet.from_pretrained("org/name")`` (Hugging Face Hub). The model carries
    ``model.pretrained_cfg`` (input size, mean, std, threshold, class names) for preprocessing.
    """
    model = load_pretrained(resolve_pretrained(name_or_path, revision))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def pretrained_train_config(model: nn.Module) -> TrainConfig:
    """The :class:`~lmnet.config.TrainConfig` a pretrained model was trained with (as stored), or
    one built from its ``pretrained_cfg``: what prediction and evaluation need."""
    config = model.pretrained_config
    if isinstance(config.get("train_config"), dict):
        return TrainConfig.from_dict(config["train_config"])
    cfg, kwargs = config["pretrained_cfg"], dict(config["model_kwargs"])
    return TrainConfig(model=config["model"], in_channels=kwargs.pop("in_channels", 3),
                       n_classes=kwargs.pop("n_classes", 2), model_args=kwargs,
                       image_size=int(cfg["input_size"][-1]), mean=list(cfg["mean"]),
                       std=list(cfg["std"]))


def pretrained_cfg_of(cfg: TrainConfig, class_names: list[str] | None = None) -> dict[str, Any]:
    """How a model trained with ``cfg`` is used: input size, normalisation, threshold, classes."""
    out = default_pretrained_cfg(cfg.in_channels, cfg.n_classes, cfg.image_size)
    out.update(mean=list(cfg.mean), std=list(cfg.std))
    if class_names:
        out["class_names"] = list(class_names)
    return out


def export_pretrained(checkpoint: str | Path, out: str | Path, card: str,
                      class_names: list[str] | None = None) -> Path:
    """Write the pretrained folder of a checkpoint (or run folder): deployed fp16 weights, the
    config with its training config and the run's split, and ``card`` as README.md (the model
    card :func:`lmnet.engine.model_card.model_card` writes from the run's records)."""
    ckpt_path = resolve_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(ckpt_path, channels_last=False)
    extra: dict[str, Any] = {"train_config": cfg.to_dict()}
    split = checkpoint_split(ckpt_path)
    if split:
        extra["split"] = {k: v for k, v in split.items() if k in ("train", "val", "test")}
    kwargs = {"in_channels": cfg.in_channels, "n_classes": cfg.n_classes, **cfg.model_args}
    return save_pretrained(model, out, cfg.model, kwargs, pretrained_cfg_of(cfg, class_names),
                           card=card, extra=extra)
