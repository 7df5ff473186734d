"""``lmnet evaluate``: its flags are :class:`~lmnet.engine.evaluate.EvaluateConfig`'s fields."""
from __future__ import annotations

import argparse

from lmnet.cli._flags import add_quiet, config_flags, config_from_args, old_spelling
from lmnet.deploy.loading import ENGINE_CHOICES
from lmnet.engine.evaluate import EvaluateConfig, evaluate
from lmnet.metrics import markdown_table


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvaluateConfig, args, args.config_keys)
    result, out = evaluate(cfg, progress=not args.quiet)
    print(markdown_table(result))
    print(f"wrote {out / 'metrics.json'}, {out / 'per_image.csv'} and {out / 'metrics.md'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a run's checkpoint on its test split",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    keys = config_flags(p, EvaluateConfig)
    old_spelling(p, "--engine", "--backend", "backend", choices=ENGINE_CHOICES)
    add_quiet(p)
    p.set_defaults(func=run, config_keys=keys)
