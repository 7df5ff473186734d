"""Checkpoints that rebuild their model alone: weights plus the resolved config."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmnet.config import TrainConfig
from lmnet.models import create_model
from lmnet.models import deploy as deploy_model
from lmnet.models._hub import is_pretrained_folder, load_weights
from lmnet.run_folder import RunFolder

__all__ = ["build_model", "resolve_checkpoint", "load_checkpoint", "load_weights",
           "model_from_checkpoint", "model_source"]


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model a config describes: in training form, or re-parameterised where
    ``cfg.deployed_form`` (a run that continues from deployed weights trains that network)."""
    model = create_model(cfg.model, in_channels=cfg.in_channels, n_classes=cfg.n_classes,
                         **cfg.model_args)
    if cfg.deployed_form:
        deploy_model(model).train()
    return model


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its ``checkpoint_best.pt``, else ``checkpoint_last.pt``)."""
    p = Path(path)
    if p.is_dir():
        found = RunFolder(p).checkpoint()
        if found is not None:
            return found
        raise FileNotFoundError(f"no {RunFolder.BEST} or {RunFolder.LAST} in {p}: give a run "
                                "folder of lmnet train, a checkpoint file, or a pretrained folder "
                                "(config.json + model.safetensors)")
    if not p.is_file():
        raise FileNotFoundError(f"no such checkpoint or run folder: {p}")
    return p


def model_source(checkpoint: str | Path | None, weights: str | Path | None
                 ) -> tuple[str | Path | None, str | Path | None]:
    """``(checkpoint, weights)`` with a pretrained folder given where a checkpoint or run folder
    goes moved to ``weights``: every command that takes a run takes a pretrained folder too."""
    if checkpoint is not None and weights is None and is_pretrained_folder(checkpoint):
        return None, checkpoint
    return checkpoint, weights


def _legacy_numpy_globals() -> list[Any]:
    """What checkpoints of lmnet 0.1.0 hold besides tensors: one uint32 numpy array (an RNG state)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict without executing anything from the file.

    ``torch.load(weights_only=True)`` admits tensors, containers and numbers only (plus, for
    checkpoints written by lmnet 0.1.0, numpy's array type); anything else is refused with a
    ``ValueError`` that says so, and nothing from the file runs.
    """
    p = resolve_checkpoint(path)
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad or unsafe file
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else type(err).__name__)
        if "GLOBAL" in detail:  # a pickle that asks to import and call something
            raise ValueError(f"{p} is not a readable lmnet checkpoint: it asks to run code "
                             f"({detail.removeprefix('WeightsUnpickler error: ')}); lmnet loads only "
                             "tensors and plain values from a file, never code") from None
        raise ValueError(f"{p} is not a readable lmnet checkpoint ({detail}); lmnet loads only "
                         "tensors and plain values from a file, never code") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{p} is not an lmnet checkpoint (no 'model' and 'config' entries)")
    if not isinstance(ckpt["config"], dict):
        raise ValueError(f"{p} is not an lmnet checkpoint: its 'config' is a "
                         f"{type(ckpt['config']).__name__}, not a mapping of config keys")
    return ckpt


def model_from_checkpoint(path: str | Path, deploy: bool = True, channels_last: bool = True
                          ) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model of a checkpoint, load its weights, and prepare it for inference.

    ``deploy`` re-parameterises it; ``channels_last`` stores its weights channels-last, which
    oneDNN runs about 1.4x faster on a CPU (``docs/performance.md``); results are unchanged.
    """

    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg)
    load_weights(model, ckpt["model"], path)
    model.eval()
    if deploy:
        deploy_model(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, cfg
