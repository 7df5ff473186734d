"""``lmnet list-models``: the registered models with their parameter counts."""
from __future__ import annotations

import argparse
import json

from lmnet.models import create_model, get_model_entry, list_models
from lmnet.models._size import count_parameters


def run(args: argparse.Namespace) -> int:
    rows = []
    for name in list_models(args.filter):
        entry = get_model_entry(name)
        rows.append({"name": name, "params": count_parameters(create_model(name)),
                     "table": entry.table, "family": entry.family,
                     "description": entry.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        raise ValueError(f"no model matches {args.filter!r}")
    print(f"{'name':<34}{'params':>12}  {'table':<6}description")
    for r in rows:
        print(f"{r['name']:<34}{r['params']:>12,}  {r['table']:<6}{r['description']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list-models", help="registered models with parameter counts",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--filter", default=None, help="glob on the name, e.g. 'lmnet_*'")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
