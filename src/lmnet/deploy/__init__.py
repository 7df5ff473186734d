"""Deployment: the re-parameterised model, checkpoints, preprocessing, engines and export.

``lmnet.deploy(model)`` re-parameterises a model in place for inference (this package is
callable, so that the one verb of the house style stays ``lmnet.deploy``); the modules below load
checkpoints (:mod:`~lmnet.deploy.checkpoint`), preprocess images (:mod:`~lmnet.deploy.preprocess`),
run models (:mod:`~lmnet.deploy.engines`) and export them (:mod:`~lmnet.deploy.export`, which needs
the ``export`` extra).
"""
from __future__ import annotations

import sys
import types

from torch import nn

from lmnet.deploy.checkpoint import load_checkpoint, model_from_checkpoint
from lmnet.deploy.preprocess import preprocess
from lmnet.models import deploy

__all__ = ["deploy", "load_checkpoint", "model_from_checkpoint", "preprocess"]


class _CallableModule(types.ModuleType):
    def __call__(self, model: nn.Module) -> nn.Module:
        return deploy(model)


sys.modules[__name__].__class__ = _CallableModule
