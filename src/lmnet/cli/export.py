"""``lmnet export``: its flags are :class:`~lmnet.engine.export.ExportConfig`'s fields."""
from __future__ import annotations

import argparse

from lmnet.cli._flags import config_flags, config_from_args
from lmnet.engine.export import ExportConfig, describe_export, export


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(ExportConfig, args, args.config_keys)
    for line in describe_export(cfg, export(cfg)):
        print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained model (re-parameterised) to ONNX, OpenVINO "
                       "(fp32 or int8), TorchScript or a pretrained folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(func=run, config_keys=config_flags(p, ExportConfig))
