"""Model zoo: LM-Net, its ablations and MONAI baselines behind one registry.

Importing this package imports every model file, which registers its models
(:func:`~lmnet.models._registry.register_model`); there is no lazy loading.
"""
# LM-Net's variants first, then the baselines: the registry lists models in this order.
from lmnet.models.lmnet import LMNet, LMNetConfig  # noqa: I001
from lmnet.models import baselines  # noqa: F401 - registers the baselines
from lmnet.models._registry import (
    ModelEntry,
    UnknownModelError,
    create_model,
    get_model_entry,
    list_models,
    register_model,
)
from lmnet.models._reparam import deploy

__all__ = ["ModelEntry", "UnknownModelError", "create_model", "deploy", "get_model_entry",
           "list_models", "register_model", "LMNet", "LMNetConfig"]
