"""Checkpoints that rebuild their model alone: weights plus the resolved config."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmnet.models import create_model
from lmnet.train.config import TrainConfig

__all__ = ["build_model", "resolve_checkpoint", "load_checkpoint", "model_from_checkpoint"]


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model a config describes, in training form."""
    return create_model(cfg.model, in_channels=cfg.in_channels, n_classes=cfg.n_classes,
                        **cfg.model_args)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its ``checkpoint_best.pt``, else ``checkpoint_last.pt``)."""
    p = Path(path)
    if p.is_dir():
        for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"no checkpoint_best.pt or checkpoint_last.pt in {p}")
    if not p.is_file():
        raise FileNotFoundError(f"no such checkpoint or run folder: {p}")
    return p


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU; clear error for files that are not lmnet checkpoints."""
    p = resolve_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"{p} is not a readable checkpoint: {err}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{p} is not an lmnet checkpoint (no 'model' and 'config' entries)")
    return ckpt


def model_from_checkpoint(path: str | Path, deploy: bool = True, channels_last: bool = True
                          ) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model of a checkpoint, load its weights, and prepare it for inference.

    ``deploy`` re-parameterises it; ``channels_last`` stores its weights channels-last, which
    oneDNN runs about 1.4x faster on a CPU (``docs/performance.md``); results are unchanged.
    """
    from lmnet import deploy as deploy_model

    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    if deploy:
        deploy_model(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, cfg
