"""Entry point of the ``lmnet`` command."""
from __future__ import annotations

import argparse
import sys

from lmnet._version import __version__
from lmnet.cli import demo, experiment, models, scoring, serve, training
from lmnet.cli._flags import old_spelling_notes
from lmnet.runtime import govern_threads, keep_freed_memory, set_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmnet", description="LM-Net for 2-D medical image segmentation.")
    parser.add_argument("--version", action="version", version=f"lmnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    models.register(sub)
    scoring.register(sub)
    training.register(sub)
    demo.register(sub)
    experiment.register(sub)
    serve.register(sub)
    for command in sub.choices.values():  # every command takes --threads
        command.add_argument("--threads", type=int, default=None,
                             help="compute threads (default: $LMNET_THREADS, else the CPUs this "
                                  "process may use: affinity and cgroup quota)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    keep_freed_memory()  # no page-fault storm on every forward pass (lmnet.runtime)
    _log_to_stderr()
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


def _log_to_stderr() -> None:
    """lmnet's log lines (notes and warnings) go to standard error as plain lines."""
    import logging

    logger = logging.getLogger("lmnet")
    if not any(getattr(h, "_lmnet_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._lmnet_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
