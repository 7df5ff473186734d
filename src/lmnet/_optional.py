"""Optional dependencies: import them or say which extra installs them."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """``import module``, or a ``ValueError`` telling the user to install lmnet's ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"this needs the package {module.split('.')[0]!r}, part of lmnet's "
                         f"{extra!r} extra: pip install 'lmnet[{extra}]'") from None
