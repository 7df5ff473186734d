"""``lmnet aggregate``: mean ± std over runs of several ``metrics.json`` files."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmnet.metrics import aggregate_runs, runs_table


def run(args: argparse.Namespace) -> int:
    results = []
    for path in args.metrics:
        p = Path(path)
        if p.is_dir():
            p = p / "metrics.json"
        if not p.is_file():
            raise FileNotFoundError(f"no metrics file at {path}")
        try:
            results.append(json.loads(p.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"{p} is not valid JSON: {err}") from None
    agg = aggregate_runs(results)
    print(runs_table(agg))
    if args.out:
        Path(args.out).write_text(json.dumps(agg, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("aggregate", help="mean ± std over runs of several metrics.json files",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics.json files or folders holding one")
    p.add_argument("--out", default=None, help="write the aggregate as JSON here")
    p.set_defaults(func=run)
