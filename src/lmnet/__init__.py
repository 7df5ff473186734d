"""lmnet: LM-Net for 2-D medical image segmentation, on CPU or GPU, without CUDA extensions."""
from __future__ import annotations

from lmnet import deploy  # callable: lmnet.deploy(model) re-parameterises
from lmnet._version import __version__
from lmnet.deploy.pretrained import from_pretrained
from lmnet.models import LMNet, LMNetConfig, create_model, list_models

__all__ = ["__version__", "create_model", "list_models", "deploy", "from_pretrained", "LMNet",
           "LMNetConfig"]
