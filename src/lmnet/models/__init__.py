"""Model zoo: LM-Net, its ablations and MONAI baselines behind one registry."""
from lmnet.models._registry import (
    ModelEntry,
    UnknownModelError,
    create_model,
    get_model_entry,
    list_models,
    register_model,
)
from lmnet.models.lmnet import LMNet, LMNetConfig

__all__ = ["ModelEntry", "UnknownModelError", "create_model", "get_model_entry", "list_models",
           "register_model", "LMNet", "LMNetConfig"]
