"""Building config dataclasses from mappings, with a clear error for unknown keys and wrong types."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
          list: "a list", dict: "a mapping", type(None): "null"}


def _accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` fits ``hint`` (scalars, optionals, lists, dicts; other hints pass)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_accepts(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {_describe(item).removeprefix('a ')}s"
    if origin is dict:
        return "a mapping"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def dataclass_from_dict(cls: type[T], values: dict[str, Any], what: str) -> T:
    """``cls(**values)``; unknown keys and values of the wrong type raise ``ValueError`` naming them.

    A float field also takes a string that reads as a number (YAML 1.1 reads ``1e-3`` as a string).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    values = dict(values)
    for key, value in values.items():
        hint = hints[key]
        if isinstance(value, str) and _accepts(hint, 0.5) and not _accepts(hint, value):
            try:
                values[key] = value = float(value)
            except ValueError:
                pass
        if not _accepts(hint, value):
            raise ValueError(f"{key} must be {_describe(hint)}, got {value!r}")
    return cls(**values)
