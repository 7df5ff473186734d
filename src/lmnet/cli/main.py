"""Entry point of the ``lmnet`` command."""
from __future__ import annotations

import argparse
import sys

from lmnet._version import __version__
from lmnet.cli import demo, experiment, models, scoring, training
from lmnet.runtime import keep_freed_memory, set_threads


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
    try:
        set_threads(args.threads)
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"lmnet {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
