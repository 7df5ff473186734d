"""``lmnet experiment``."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from lmnet.engine.experiments import (
        load_experiment,
        run_experiment,
        write_figures,
        write_tables,
    )

    cfg = load_experiment(args.config, args.setting)
    if args.out:
        cfg.out = args.out
    if args.tables_only:
        written = {**write_tables(cfg, args.data), **write_figures(cfg, args.data)}
        print("wrote " + ", ".join(str(p) for p in written.values()))
        return 0
    run_experiment(cfg, args.data, dry_run=args.dry_run, progress=not args.quiet, echo=print,
                   time_budget=args.time_budget)
    if not args.dry_run:
        print(f"tables: {cfg.out}/{cfg.name}/table_paper.md, table_foreground.md (and .csv); "
              "figures: curves.png, qualitative.png")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="train and evaluate a matrix of models x seeds; tables",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", help="experiment YAML (configs/experiments/)")
    p.add_argument("--setting", default=None,
                   help="a named alternative of the recipe in the config (e.g. gpu)")
    p.add_argument("--data", default=None, help="dataset folder (default: the config's)")
    p.add_argument("--out", default=None, help="parent folder of the results (default: the config's)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs, their state and the estimated time; train nothing")
    p.add_argument("--tables-only", action="store_true",
                   help="rewrite the tables and figures from the finished runs; train nothing")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop this call cleanly after MINUTES of wall-clock (the run in progress is "
                        "saved; the same command resumes it); each run's own cap is the config's "
                        "budget_minutes")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
