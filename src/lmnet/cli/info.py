"""``lmnet info``: parameters and MACs of a model, training and deployed form."""
from __future__ import annotations

import argparse
import json

from lmnet.cli._flags import add_model_args, parse_overrides
from lmnet.models import create_model, get_model_entry
from lmnet.models._size import size_report

#: What the paper states for LM-Net (its text, not our measurement).
PAPER_PARAMS = "5.4 M"
PAPER_FLOPS = "4.66 G"


def _fmt_g(macs: int) -> str:
    return f"{macs / 1e9:.3f} G"


def run(args: argparse.Namespace) -> int:
    kwargs = {"in_channels": args.in_channels, "n_classes": args.n_classes,
              **parse_overrides(args.set)}
    entry = get_model_entry(args.model)
    if args.size % 16 or args.size < 32:
        raise ValueError(f"--size must be a multiple of 16 and at least 32, got {args.size}")
    model = create_model(args.model, **kwargs)
    report = size_report(model, args.model, args.size, args.in_channels)
    config = getattr(model, "config", None)
    if args.json:
        d = report.to_dict()
        d["description"] = entry.description
        d["macs_unit"] = "multiply-accumulates (torch FlopCounterMode FLOPs / 2)"
        if config is not None:
            d["config"] = config.to_dict()
        if args.model == "lmnet" and not args.set:
            d["paper_states"] = {"params": PAPER_PARAMS, "flops": PAPER_FLOPS}
        print(json.dumps(d, indent=2))
        return 0
    c, h, w = report.input_size
    print(f"{args.model}: {entry.description}")
    print(f"input {c} x {h} x {w}; MACs = multiply-accumulates (the paper's 'FLOPs'),"
          " from torch.utils.flop_counter\n")
    print(f"{'form':<22}{'parameters':>14}{'MACs':>14}")
    print(f"{'training':<22}{report.params_train:>14,}{_fmt_g(report.macs_train):>14}")
    print(f"{'deployed (reparam.)':<22}{report.params_deployed:>14,}{_fmt_g(report.macs_deployed):>14}")
    if args.model == "lmnet" and not args.set and args.in_channels == 3 and args.n_classes == 2:
        print(f"{'paper states':<22}{PAPER_PARAMS:>14}{PAPER_FLOPS:>14}"
              "   (does not match the described network)")
    if report.macs_neighborhood_attention:
        print(f"\nincludes {report.macs_neighborhood_attention / 1e6:.1f} M MACs of neighborhood "
              "attention (2 k^2 C per position; elementwise ops the counter does not see)")
    if config is not None:
        print("\nconfig: " + ", ".join(f"{k}={v}" for k, v in config.to_dict().items()))
    print("\nparameters by part (training form):")
    for part, n in report.parts.items():
        print(f"  {part:<14}{n:>12,}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters and MACs of a model, training and deployed form",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default="lmnet", help="registered model name")
    p.add_argument("--size", type=int, default=256, help="side of the square input, pixels")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_args(p)
    p.set_defaults(func=run)
