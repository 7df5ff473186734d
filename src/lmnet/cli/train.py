"""``lmnet train``: its flags are :class:`~lmnet.config.TrainConfig`'s fields."""
from __future__ import annotations

import argparse
import os

from lmnet.cli._flags import add_quiet, config_flags, old_spelling, parse_overrides
from lmnet.config import TrainConfig, load_config
from lmnet.data.layouts import FORMATS


def run(args: argparse.Namespace) -> int:
    from lmnet.engine.train import train

    overrides = {k: getattr(args, k) for k in args.config_keys}
    extra = parse_overrides(args.set)
    model_args = {k[len("model."):]: v for k, v in extra.items() if k.startswith("model.")}
    overrides.update({k: v for k, v in extra.items() if not k.startswith("model.")})
    cfg = load_config(args.config, overrides)
    if model_args:
        cfg = cfg.replace(model_args={**cfg.model_args, **model_args})
    resume = args.resume if args.resume is not None else False
    if resume is False and not cfg.data:
        raise ValueError("no dataset given: pass --data PATH or set 'data' in the config")
    run_dir = train(cfg, resume=resume, progress=not args.quiet, overrides=overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {run_dir}\n  best checkpoint: {run_dir / 'checkpoint_best.pt'}\n"
              f"  log: {run_dir / 'log.csv'}  (TensorBoard: tensorboard --logdir {run_dir / 'tb'})\n"
              f"next: lmnet evaluate {run_dir}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (paper recipe by default)")
    p.add_argument("--config", default=None, help="YAML config (e.g. configs/kvasir.yaml)")
    # every flag defaults to None: a value from --config stays unless the flag is given
    keys = config_flags(p, TrainConfig, skip=("model_args",), keep_unset=True,
                        choices={"format": FORMATS})
    old_spelling(p, "--split", "--split-file", "split_file")  # renamed: evaluate's --split is a part
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue a run exactly (its own config; --epochs/--time-budget may change)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any config key; model.KEY=VALUE for model options, e.g. model.width=24")
    add_quiet(p)
    p.set_defaults(func=run, config_keys=keys)
