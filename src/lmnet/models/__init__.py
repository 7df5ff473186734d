"""Model zoo: LM-Net, its ablations and MONAI baselines behind one registry."""
from torch import nn

from lmnet.models._registry import (
    ModelEntry,
    UnknownModelError,
    create_model,
    get_model_entry,
    list_models,
    register_model,
)
from lmnet.models.lmnet import LMNet, LMNetConfig

__all__ = ["ModelEntry", "UnknownModelError", "create_model", "deploy", "get_model_entry",
           "list_models", "register_model", "LMNet", "LMNetConfig"]


def deploy(model: nn.Module) -> nn.Module:
    """Re-parameterise ``model`` in place for inference (eval mode, branches folded); returns it.

    Models without a ``reparameterize`` method are only put in eval mode. Public as ``lmnet.deploy``.
    """
    if hasattr(model, "reparameterize"):
        model.reparameterize()
    return model.eval()
