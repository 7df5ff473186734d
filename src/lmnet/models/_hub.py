"""The pretrained-model folder, in the Hugging Face layout: ``config.json`` (the model's name and
options, and how to use it: input size, mean/std, threshold, class names, as timm's
``pretrained_cfg``), ``model.safetensors`` (the deployed weights) and ``README.md`` (the model
card). Written and read without pickle: the weights are safetensors, the config is JSON."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmnet._defaults import IMAGENET_MEAN, IMAGENET_STD
from lmnet._files import atomic_save, atomic_write_text
from lmnet._version import __version__
from lmnet.models._registry import create_model
from lmnet.models._reparam import deploy

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME", "load_weights", "default_pretrained_cfg",
           "is_pretrained_folder",
           "save_pretrained",
           "read_config", "load_pretrained"]

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"


def load_weights(model: nn.Module, state: Any, source: str | Path) -> None:
    """``model.load_state_dict(state)``, with a short ``ValueError`` when the weights do not fit."""
    own = model.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} holds no weights (not a mapping of names to tensors)")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or reshaped:
        first = (missing or unexpected or reshaped)[0]
        raise ValueError(f"the weights in {source} do not fit the model its config describes: "
                         f"{len(missing)} tensors missing, {len(unexpected)} unexpected, "
                         f"{len(reshaped)} of another shape (first: {first}); a file of another "
                         "architecture, width or number of classes?")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"the weights in {source} hold NaN or infinite values ({len(bad)} "
                         f"tensor(s), first: {bad[0]}): a diverged or damaged model would give "
                         "meaningless masks")
    model.load_state_dict(state)


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a pretrained folder (``config.json`` and ``model.safetensors``) and not
    a run folder (which holds checkpoints)."""
    p = Path(path)
    return (p.is_dir() and (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()
            and not any(p.glob("checkpoint_*.pt")))


def default_pretrained_cfg(in_channels: int = 3, n_classes: int = 2, size: int = 256
                           ) -> dict[str, Any]:
    """How a model is used unless told otherwise: ``size`` x ``size`` input, ImageNet
    normalisation, threshold 0.5 on the lesion probability."""
    return {"input_size": [in_channels, size, size], "interpolation": "bilinear",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "threshold": 0.5,
            "class_names": ["background", "lesion"] if n_classes > 1 else ["lesion"],
            "output": "logits (N, n_classes, H, W); softmax, class 1 = lesion" if n_classes > 1
            else "logits (N, 1, H, W); sigmoid = lesion"}


def save_pretrained(model: nn.Module, folder: str | Path, model_name: str,
                    model_kwargs: dict[str, Any], pretrained_cfg: dict[str, Any],
                    card: str | None = None, dtype: torch.dtype = torch.float16,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a pretrained folder, re-parameterised for inference.

    Args:
        model: saved re-parameterised (``lmnet.deploy`` of a copy; ``model`` is not changed).
        folder: created if needed; files of the same names are replaced.
        model_name, model_kwargs: what ``lmnet.create_model(model_name, **model_kwargs)`` needs
            to rebuild it (``in_channels`` and ``n_classes`` included).
        pretrained_cfg: how to use it: ``input_size`` ``[C, H, W]``, ``mean``, ``std``,
            ``threshold``, ``class_names`` and anything else a user needs.
        card: the model card, written as ``README.md`` (none if None).
        dtype: floating-point weights are stored in this dtype (fp16 halves the file; the
            model computes in fp32 after loading).
        extra: more keys for ``config.json`` (the training config, for instance).
    """
    from safetensors.torch import save_file

    model = deploy(copy.deepcopy(model))  # the caller's model stays as it was
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    # each file whole or not at all, with the user's umask (safetensors alone writes 0600)
    atomic_save(folder / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    config = {"model": model_name, "model_kwargs": dict(model_kwargs),
              "pretrained_cfg": dict(pretrained_cfg),
              "weights": {"form": "deployed", "dtype": str(dtype).removeprefix("torch.")},
              "lmnet_version": __version__, **(extra or {})}
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    if card is not None:
        atomic_write_text(folder / CARD_NAME, card)
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a pretrained folder, checked; ``ValueError`` naming what is wrong."""
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} is not a pretrained lmnet model: {name} is missing "
                             f"(a pretrained folder holds {CONFIG_NAME}, {WEIGHTS_NAME} and "
                             f"{CARD_NAME})")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{folder / CONFIG_NAME} must hold a JSON object")
    missing = [k for k in ("model", "model_kwargs", "pretrained_cfg") if k not in config]
    if missing:
        raise ValueError(f"{folder / CONFIG_NAME} lacks {', '.join(missing)}")
    if not isinstance(config["model_kwargs"], dict) or not isinstance(config["pretrained_cfg"], dict):
        raise ValueError(f"{folder / CONFIG_NAME}: model_kwargs and pretrained_cfg must be objects")
    return config


def load_pretrained(folder: str | Path) -> nn.Module:
    """Rebuild, re-parameterise and load the model of a pretrained folder (fp32, eval mode).

    The model gets ``pretrained_cfg`` (a dict) and ``pretrained_config`` (all of config.json) as
    attributes. Raises ``ValueError`` for a folder that is not one, or weights that do not fit.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    try:
        model = deploy(create_model(config["model"], **config["model_kwargs"]))
    except TypeError as err:
        raise ValueError(f"{folder / CONFIG_NAME}: model_kwargs do not fit {config['model']!r}: "
                         f"{err}") from None
    try:
        state = load_file(str(folder / WEIGHTS_NAME))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{folder / WEIGHTS_NAME} is not a readable safetensors file: {err}") from None
    own = model.state_dict()
    load_weights(model, {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()},
                 folder / WEIGHTS_NAME)
    model.pretrained_cfg = config["pretrained_cfg"]
    model.pretrained_config = config
    return model.eval()
