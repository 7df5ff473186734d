"""Flags renamed in this release, still accepted under their old spelling with a one-line note."""
from __future__ import annotations

import argparse
from typing import Any

__all__ = ["old_spelling", "old_spelling_notes"]


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
