"""Model registry: ``register_model``, ``create_model``, ``list_models`` (after timm / smp).

The model files register themselves when :mod:`lmnet.models` imports them."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

__all__ = ["ModelEntry", "register_model", "create_model", "list_models", "get_model_entry",
           "UnknownModelError"]


class UnknownModelError(ValueError):
    """Raised for a model name that is not registered; the message lists the known names."""


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, a one-line description, the paper table it belongs to."""

    name: str
    builder: Callable[..., nn.Module]
    description: str
    table: str = ""
    family: str = "lmnet"


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str, table: str = "", family: str = "lmnet"
                   ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn(**kwargs) -> nn.Module`` under ``name``."""

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, description, table, family)
        return fn

    return decorate


def list_models(pattern: str | None = None, family: str | None = None) -> list[str]:
    """Registered names in registration order, optionally filtered by a glob and a family."""
    return [n for n, e in _REGISTRY.items()
            if (pattern is None or fnmatch.fnmatch(n, pattern))
            and (family is None or e.family == family)]


def get_model_entry(name: str) -> ModelEntry:
    """The entry of ``name``; :class:`UnknownModelError` lists the known names otherwise."""
    if name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name}*")
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(_REGISTRY)}"
        )
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: registered name, see :func:`list_models`.
        **kwargs: ``in_channels``, ``n_classes`` for every model; LM-Net variants also take any
            field of :class:`lmnet.models.lmnet.LMNetConfig` (``width``, ``branches``, ...).

    Returns:
        The model in training form; it maps ``(B, in_channels, H, W)`` to logits
        ``(B, n_classes, H, W)``.
    """
    return get_model_entry(name).builder(**kwargs)
