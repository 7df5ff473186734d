"""lmnet: LM-Net for 2-D medical image segmentation, on CPU or GPU, without CUDA extensions."""
from __future__ import annotations

from torch import nn

from lmnet.models import LMNet, LMNetConfig, create_model, list_models

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models", "deploy", "LMNet", "LMNetConfig"]


def deploy(model: nn.Module) -> nn.Module:
    """Re-parameterise ``model`` in place for inference (eval mode, branches folded); returns it.

    Models without a ``reparameterize`` method are only put in eval mode.
    """
    if hasattr(model, "reparameterize"):
        model.reparameterize()
    return model.eval()
