"""Deployment: the re-parameterised model, checkpoints, pre- and post-processing, backends, export.

``lmnet.deploy(model)`` re-parameterises a model in place for inference (this package is
callable, so that the one verb of the house style stays ``lmnet.deploy``). The modules read
bottom-up, each importing only those above it in this list:

- :mod:`~lmnet.deploy.checkpoint`: checkpoints and run folders -> model and config;
- :mod:`~lmnet.deploy.metadata`: what an exported file stores (config, split, int8);
- :mod:`~lmnet.deploy.preprocess`, :mod:`~lmnet.deploy.postprocess`: images in; probabilities,
  test-time augmentation and masks out;
- :mod:`~lmnet.deploy.convert`: ONNX, TorchScript and OpenVINO conversions (cached);
- :mod:`~lmnet.deploy.backends`: PyTorch, ONNX Runtime and OpenVINO runners;
- :mod:`~lmnet.deploy.quantize`: OpenVINO int8 with NNCF;
- :mod:`~lmnet.deploy.pretrained`: shipped, local and Hub pretrained folders;
- :mod:`~lmnet.deploy.loading`: any model source -> a :class:`~lmnet.deploy.loading.Predictor`
  on the backend asked for or measured fastest;
- :mod:`~lmnet.deploy.export`: files for other runtimes, checked (the ``export`` extra).
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
