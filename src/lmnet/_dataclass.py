"""Building config dataclasses from mappings with a clear error for unknown keys."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], values: dict[str, Any], what: str) -> T:
    """``cls(**values)``; unknown keys raise ``ValueError`` naming them and the valid ``what``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid: {sorted(names)}")
    return cls(**values)
