"""``lmnet demo``."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from lmnet.engine.demo import run_demo

    report = run_demo(args.out, args.minutes, args.image_size, args.epochs, progress=not args.quiet)
    print((report / "README.md").read_text())
    print(f"demo report: {report}/ (README.md, metrics.md, per_image.csv, predictions/overlays/)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train LM-Net for a few minutes on the bundled sample and report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="lmnet_demo", help="output folder")
    p.add_argument("--minutes", type=float, default=3.5, help="training time budget")
    p.add_argument("--epochs", type=int, default=25, help="training epochs (cosine schedule length)")
    p.add_argument("--image-size", type=int, default=128, help="training side in pixels")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
