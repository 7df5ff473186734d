"""Command-line flags built from config dataclasses, and flags renamed in this release (still
accepted under their old spelling with a one-line note)."""
from __future__ import annotations

import argparse
from typing import Any

__all__ = ["old_spelling", "old_spelling_notes", "config_flags", "config_from_args",
           "parse_overrides", "add_model_args", "add_quiet"]


class _OldSpelling(argparse.Action):
    """Stores into the new flag's ``dest`` (appending where the new flag appends) and records a
    note for the command to print; hidden from ``--help``."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", append: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.append = new, append

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if self.append:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)
        notes = list(getattr(namespace, "_old_spellings", None) or [])
        note = (f"note: {option_string} is now {self.new}; the old spelling is accepted until the "
                "next release")
        if note not in notes:
            notes.append(note)
        namespace._old_spellings = notes


def old_spelling(p: argparse.ArgumentParser, old: str, new: str, dest: str, append: bool = False,
                 **kwargs: Any) -> None:
    """Accept ``old`` as ``new`` (same ``dest``, same choices/type via ``kwargs``)."""
    p.add_argument(old, dest=dest, action=_OldSpelling, new=new, append=append,
                   help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def old_spelling_notes(args: argparse.Namespace) -> list[str]:
    """The notes of the old spellings this command line used."""
    return list(getattr(args, "_old_spellings", None) or [])


def config_flags(p: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                 keep_unset: bool = False, choices: dict[str, Any] | None = None) -> list[str]:
    """One argument per field of the config dataclass ``cls``, built from the dataclass: the
    field's type (``bool``: a switch; ``list``: several values), its comment in the class source
    as help, its default shown once. A field's ``metadata`` may name ``flag`` (another name),
    ``positional`` (``True`` or an ``nargs``), ``choices``, ``metavar``, ``nargs``, ``const``,
    ``required`` and ``help``. ``keep_unset``: every flag defaults to None (so that a value from a
    config file stays unless the flag is given). Returns the field names, in order."""
    import dataclasses
    import types
    import typing

    from lmnet.config import field_help

    helps = field_help(cls)
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = dict(f.metadata)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        hint = hints[f.name]
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
        base = [t for t in typing.get_args(hint) if t is not type(None)] if optional else [hint]
        text = meta.get("help", helps.get(f.name, ""))
        kwargs: dict[str, Any] = {}
        if "choices" in meta or (choices and f.name in choices):
            kwargs["choices"] = meta.get("choices", (choices or {}).get(f.name))
        for key in ("metavar", "nargs", "const", "required"):
            if key in meta:
                kwargs[key] = meta[key]
        if meta.get("positional"):
            if meta["positional"] is not True:
                kwargs["nargs"] = meta["positional"]
            kwargs.pop("required", None)
            p.add_argument(f.name, default=default, type=base[0] if hint is not bool else None,
                           help=text, **kwargs)
            keys.append(f.name)
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        kwargs["dest"] = f.name
        if hint is bool and keep_unset:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif hint is bool:
            kwargs["action"] = "store_false" if default else "store_true"
            flag = meta.get("flag", ("--no-" if default else "--") + f.name.replace("_", "-"))
        else:
            if typing.get_origin(base[0]) is list:
                kwargs.setdefault("nargs", "+")
                kwargs.setdefault("metavar", "X")
                kwargs["type"] = typing.get_args(base[0])[0]
            else:
                kwargs["type"] = base[0]
        if keep_unset:
            kwargs["default"] = None
            text = f"{text} (default: {default})"
        elif hint is not bool:
            kwargs["default"] = default
        p.add_argument(flag, help=text, **kwargs)
        keys.append(f.name)
    return keys


def config_from_args(cls: type, args: argparse.Namespace, keys: list[str]) -> Any:
    """``cls`` built from the parsed flags of :func:`config_flags`."""
    return cls(**{k: getattr(args, k) for k in keys})


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["width=24", "branches=3x3,5x5"]`` -> ``{"width": 24, "branches": "3x3,5x5"}``."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value else ""
    return out


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--in-channels``, ``--n-classes`` and ``--model-option KEY=VALUE`` (repeatable)."""
    p.add_argument("--in-channels", type=int, default=3, help="input image channels")
    p.add_argument("--n-classes", type=int, default=2, help="output classes")
    p.add_argument("--model-option", dest="set", action="append", metavar="KEY=VALUE",
                   help="a model option, e.g. --model-option width=24 --model-option "
                        "branches=3x3,5x5 (in train: --set model.KEY=VALUE)")
    old_spelling(p, "--set", "--model-option", "set", append=True, metavar="KEY=VALUE")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes")
