"""``lmnet score``: score predicted masks against true masks (no model needed)."""
from __future__ import annotations

import argparse

from lmnet.cli._flags import add_quiet
from lmnet.metrics import markdown_table, write_report
from lmnet.metrics.folders import score_folders


def _empty_distance(value: str) -> float | str:
    if value == "diagonal":
        return value
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected 'diagonal' or a number") from None
    if v < 0:
        raise argparse.ArgumentTypeError("the distance must be >= 0")
    return v


def run(args: argparse.Namespace) -> int:
    spacing = tuple(args.spacing) if args.spacing else None
    if spacing is not None and min(spacing) <= 0:
        raise ValueError(f"--spacing must be positive, got {list(spacing)}")
    ev = score_folders(args.pred_dir, args.true_dir, spacing, args.empty_distance, args.recursive,
                       progress=not args.quiet)
    result = ev.aggregate()
    extra = {"command": "score", "pred_dir": str(args.pred_dir), "true_dir": str(args.true_dir)}
    paths = write_report(result, ev.rows, args.out, extra)
    print(markdown_table(result))
    print(f"wrote {paths['json']}, {paths['csv']} and {paths['md']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score predicted masks against true masks (no model needed)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pred_dir", help="folder of predicted masks")
    p.add_argument("true_dir", help="folder of true masks with the same file stems")
    p.add_argument("--out", default="score", help="folder for metrics.json, per_image.csv, metrics.md")
    p.add_argument("--spacing", type=float, nargs=2, metavar=("SY", "SX"), default=None,
                   help="pixel size for boundary metrics in physical units (default: pixels)")
    p.add_argument("--empty-distance", type=_empty_distance, default="diagonal",
                   help="boundary distance when exactly one mask is empty: 'diagonal' or a number")
    p.add_argument("--recursive", action="store_true",
                   help="search sub-folders; a truth file's sub-folder is its subgroup")
    add_quiet(p)
    p.set_defaults(func=run)
