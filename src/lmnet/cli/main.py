"""Entry point of the ``lmnet`` command."""
from __future__ import annotations

import argparse
import logging
import sys

from lmnet._version import __version__
from lmnet.cli import (
    aggregate,
    check_data,
    demo,
    evaluate,
    experiment,
    export,
    info,
    list_models,
    predict,
    score,
    serve,
    train,
)
from lmnet.cli._flags import old_spelling_notes
from lmnet.runtime import govern_threads, keep_freed_memory, set_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmnet", description="LM-Net for 2-D medical image segmentation.")
    parser.add_argument("--version", action="version", version=f"lmnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (info, list_models, score, aggregate, train, evaluate, predict, export,
                    check_data, demo, experiment, serve):  # one module per sub-command
        command.register(sub)
    for command in sub.choices.values():  # every command takes --threads
        command.formatter_class = _Help
        command.add_argument("--threads", type=int, default=None,
                             help="compute threads (default: $LMNET_THREADS, else the CPUs this "
                                  "process may use: affinity and cgroup quota)")
    return parser


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once: not where its help already says it, nor for switches and
    flags without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("(default" in text or action.required or default is None or isinstance(default, bool)
                or default in ("", argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    keep_freed_memory()  # no page-fault storm on every forward pass (lmnet.runtime)
    _log_to_stderr(quiet=getattr(args, "quiet", False))
    try:
        threads = set_threads(args.threads)
        govern_threads()  # fewer threads while other processes hold cores (lmnet.runtime)
        if args.threads is not None and threads < args.threads:
            print(f"lmnet {args.command}: note: --threads {args.threads} is more than the "
                  f"{threads} CPUs this process may use; using {threads}", file=sys.stderr)
        for note in old_spelling_notes(args):
            print(f"lmnet {args.command}: {note}", file=sys.stderr)
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as err:  # bad input, files: one line, no traceback
        print(f"lmnet {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmnet {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    """An error as the user needs it: an ``OSError`` with its file and reason, else its text."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}"
    return str(err) or type(err).__name__


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr(quiet: bool = False) -> None:
    """lmnet's log lines go to standard error as plain lines: its notes (what was chosen, what
    was found) and warnings; with ``--quiet``, warnings only."""
    logger = logging.getLogger("lmnet")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
