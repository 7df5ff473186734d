"""The one verb of deployment: re-parameterise a model in place (``lmnet.deploy``)."""
from __future__ import annotations

from torch import nn

__all__ = ["deploy"]


def deploy(model: nn.Module) -> nn.Module:
    """Re-parameterise ``model`` in place for inference (eval mode, branches folded); returns it.

    Models without a ``reparameterize`` method are only put in eval mode. Public as ``lmnet.deploy``.
    """
    if hasattr(model, "reparameterize"):
        model.reparameterize()
    return model.eval()
