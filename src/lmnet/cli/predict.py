"""``lmnet predict``: its flags are :class:`~lmnet.engine.predict.PredictConfig`'s fields."""
from __future__ import annotations

import argparse
import sys

from lmnet.cli._flags import add_quiet, config_flags, config_from_args, old_spelling
from lmnet.deploy.loading import ENGINE_CHOICES
from lmnet.engine.predict import PredictConfig, predict


def run(args: argparse.Namespace) -> int:
    if args.weights is not None:  # every positional is an input
        checkpoint, inputs = None, args.items
    elif len(args.items) < 2:
        raise ValueError("give a checkpoint (or run folder) and at least one image or folder, or "
                         "--weights NAME and the images")
    else:
        checkpoint, inputs = args.items[0], args.items[1:]
    cfg = config_from_args(PredictConfig, args, args.config_keys)
    cfg.checkpoint, cfg.inputs = checkpoint, list(inputs)
    summary = predict(cfg, progress=not args.quiet)
    if summary.note:
        print(summary.note, file=sys.stderr)
    if summary.post is not None and summary.post.sentence():
        print(summary.post.sentence(), file=sys.stderr)
    for why, paths in summary.skipped.items():
        print(f"skipped {len(paths)} file(s) in the {why} (e.g. {paths[0]})", file=sys.stderr)
    print(f"wrote {len(summary.written)} masks to {cfg.out}/masks, overlays to {cfg.out}/overlays, "
          f"areas to {summary.csv_path}")
    if summary.failed:
        print(f"{len(summary.failed)} file(s) failed:", file=sys.stderr)
        for _, msg in summary.failed:
            print(f"  {msg}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="masks, overlays and lesion areas for new images",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("items", nargs="+", metavar="CHECKPOINT_AND_INPUTS",
                   help="a checkpoint file or run folder, then image files or folders (with "
                        "--weights: only the images)")
    keys = config_flags(p, PredictConfig, skip=("checkpoint", "inputs"))
    old_spelling(p, "--engine", "--backend", "backend", choices=ENGINE_CHOICES)
    add_quiet(p)
    p.set_defaults(func=run, config_keys=keys)
