"""``lmnet train``, ``evaluate``, ``predict`` and ``check-data``."""
from __future__ import annotations

import argparse
import json
import sys

from lmnet.cli._flags import old_spelling
from lmnet.cli.models import parse_overrides
from lmnet.config import TrainConfig, field_help, load_config
from lmnet.data.layouts import FORMATS
from lmnet.deploy.backends import PRECISIONS
from lmnet.deploy.export import EXPORT_FORMATS
from lmnet.deploy.loading import BF16_AGREEMENT, ENGINE_CHOICES, PRECISION_CHOICES

#: Config keys whose flag has another name, and keys set only through ``--set`` (mappings).
_FLAG_NAMES: dict[str, str] = {}
_NO_FLAG = ("model_args",)


def _config_flags(p: argparse.ArgumentParser) -> list[str]:
    """One flag per :class:`~lmnet.config.TrainConfig` field, built from the dataclass: its type,
    its comment as help and its default, shown once. Every flag defaults to None, so that a
    value from ``--config`` stays unless the flag is given. Returns the config keys."""
    import dataclasses
    import typing

    keys = []
    helps = field_help(TrainConfig)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in _NO_FLAG:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + _FLAG_NAMES.get(f.name, f.name).replace("_", "-")
        kwargs: dict = {"dest": f.name, "default": None,
                        "help": f"{helps.get(f.name, '')} (default: {default})"}
        hint = hints[f.name]
        base = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list:
            kwargs.update(nargs="+", type=typing.get_args(hint)[0], metavar="X")
        else:
            kwargs["type"] = base[0]
        if f.name == "format":
            kwargs["choices"] = FORMATS
        p.add_argument(flag, **kwargs)
        keys.append(f.name)
    old_spelling(p, "--split", "--split-file", "split_file")  # renamed: evaluate's --split is a part
    return keys


def cmd_train(args: argparse.Namespace) -> int:
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
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"run folder: {run_dir}\n  best checkpoint: {run_dir / 'checkpoint_best.pt'}\n"
              f"  log: {run_dir / 'log.csv'}  (TensorBoard: tensorboard --logdir {run_dir / 'tb'})\n"
              f"next: lmnet evaluate {run_dir}")
    return 0


def _post_flags(p: argparse.ArgumentParser, predict: bool) -> None:
    """Test-time augmentation and mask clean-up (:class:`~lmnet.deploy.postprocess.PostProcess`).
    ``predict`` averages the flips by default (measured on the shipped model's test split: +2.1
    points of foreground Dice for 3.8x the time, its model card); ``evaluate`` scores without,
    as the paper, unless told."""
    from lmnet.deploy.postprocess import TTA_CHOICES

    p.add_argument("--tta", default="flips" if predict else "none", choices=TTA_CHOICES,
                   help="test-time augmentation: hflip (2 passes) or flips (4: identity, horizontal, "
                        "vertical, both), lesion probabilities averaged; none: one pass")
    p.add_argument("--keep-largest", action="store_true",
                   help="keep only the largest connected lesion (8-connected) of each mask")
    p.add_argument("--min-lesion-pixels", type=int, default=0, metavar="N",
                   help="drop lesions of fewer than N pixels (of the mask as scored or written)")
    if predict:
        p.add_argument("--threshold", type=float, default=0.5,
                       help="lesion probability threshold, in [0, 1]")


def _post(args: argparse.Namespace) -> "PostProcess":  # noqa: F821 - imported when called
    from lmnet.deploy.postprocess import PostProcess

    return PostProcess(args.tta, getattr(args, "threshold", 0.5), args.keep_largest,
                       args.min_lesion_pixels)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lmnet.engine.evaluate import evaluate_run
    from lmnet.metrics import markdown_table

    spacing = tuple(args.spacing) if args.spacing else None
    if (args.run is None) == (args.weights is None):
        raise ValueError("give a run folder (or checkpoint) or --weights NAME, not both or neither")
    result, out = evaluate_run(args.run, args.data, args.split, args.split_file, args.grid, args.out,
                               spacing, args.device, progress=not args.quiet,
                               precision=args.precision, weights=args.weights, engine=args.engine,
                               post=_post(args))
    print(markdown_table(result))
    print(f"wrote {out / 'metrics.json'}, {out / 'per_image.csv'} and {out / 'metrics.md'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from lmnet.engine.predict import predict_files

    if args.weights is not None:  # every positional is an input
        checkpoint, inputs = None, args.items
    elif len(args.items) < 2:
        raise ValueError("give a checkpoint (or run folder) and at least one image or folder, or "
                         "--weights NAME and the images")
    else:
        checkpoint, inputs = args.items[0], args.items[1:]
    summary = predict_files(checkpoint, inputs, args.out, args.threshold, progress=not args.quiet,
                            engine=args.engine, precision=args.precision, weights=args.weights,
                            batch_size=args.batch_size, overwrite=args.overwrite,
                            tta=args.tta, keep_largest=args.keep_largest,
                            min_lesion_pixels=args.min_lesion_pixels,
                            save_probabilities=args.save_probabilities)
    if summary.note:
        print(summary.note, file=sys.stderr)
    if summary.post is not None and summary.post.sentence():
        print(summary.post.sentence(), file=sys.stderr)
    for why, paths in summary.skipped.items():
        print(f"skipped {len(paths)} file(s) in the {why} (e.g. {paths[0]})", file=sys.stderr)
    print(f"wrote {len(summary.written)} masks to {args.out}/masks, overlays to {args.out}/overlays, "
          f"areas to {summary.csv_path}")
    if summary.failed:
        print(f"{len(summary.failed)} file(s) failed:", file=sys.stderr)
        for _, msg in summary.failed:
            print(f"  {msg}", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lmnet.deploy.checkpoint import model_source
    from lmnet.deploy.export import check_export_target, export_checkpoint

    if (args.checkpoint is None) == (args.weights is None):
        raise ValueError("give a checkpoint (or run folder) or --weights NAME, not both or neither")
    checkpoint, weights = model_source(args.checkpoint, args.weights)
    check_export_target(args.format, args.out, checkpoint, weights)  # before anything is written
    if args.format == "pretrained" and weights is not None:
        raise ValueError(f"{weights} is already a pretrained model: copy its folder instead")
    if args.format == "pretrained":
        from lmnet.engine.model_card import export_with_card

        folder = export_with_card(checkpoint, args.out)
        print(f"wrote {folder}/ (config.json, model.safetensors, README.md model card): load it "
              f"with lmnet.from_pretrained({str(folder)!r}) or --weights {folder}")
        return 0
    if (args.data is not None or args.calibration_images is not None
            or args.no_accuracy_control) and not args.int8:
        raise ValueError("--data, --calibration-images and --no-accuracy-control are for --int8")
    result = export_checkpoint(checkpoint, args.format, args.out, check=not args.no_check,
                               weights=weights, int8=args.int8, data=args.data,
                               calibration_images=args.calibration_images,
                               accuracy_control=not args.no_accuracy_control)
    if args.format == "pretrained":
        print(f"wrote {result['path']}/ (config.json, model.safetensors, README.md): load it with "
              f"lmnet.from_pretrained({result['path']!r}) or --weights {result['path']}")
        return 0
    how = "re-parameterised"
    if args.int8:
        how = f"int8, calibrated on {result['calibration_images']} training images"
        if result["validation_images"]:
            how += (f", fp32 layers kept where needed to stay within 0.5 points of fp32's Dice on "
                    f"{result['validation_images']} validation images")
    print(f"wrote {result['path']} ({args.format}, {how}, dynamic batch and size)")
    if "max_abs_diff" in result:
        print(f"largest logit difference to PyTorch on shapes {result['check_shapes']}: "
              f"{result['max_abs_diff']:.2e}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from lmnet.data.check import check_dataset

    report = check_dataset(args.path, args.format, read=not args.no_read, progress=not args.quiet)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['path']}: format {report['format']}, {report['images']} images, "
              f"{report['mask_files']} mask files")
        if report["groups"]:
            print("  subgroups: " + ", ".join(f"{k} {v}" for k, v in sorted(report["groups"].items())))
        if report["patients"]:
            print(f"  patients: {report['patients']}")
        if report["images_with_several_masks"]:
            print(f"  images with several masks (their union is used): "
                  f"{report['images_with_several_masks']}")
        if "sizes" in report:
            s = report["sizes"]
            print(f"  sizes: height {s['min_height']}-{s['max_height']}, width "
                  f"{s['min_width']}-{s['max_width']}, {s['distinct']} distinct")
            print(f"  empty masks: {report['empty_masks']}")
            sus = report["suspicious_masks"]
            print(f"  suspicious masks: {len(sus)}")
            for line in sus[:20]:
                print(f"    {line}")
            if len(sus) > 20:
                print(f"    ... and {len(sus) - 20} more")
        print(f"  problems: {len(report['problems'])}")
        for p in report["problems"][:20]:
            print(f"    {p}")
    suspicious = len(report.get("suspicious_masks", []))
    if report["problems"]:
        return 1
    if suspicious and not args.allow_suspicious:
        print(f"{suspicious} suspicious mask(s): fix them, or pass --allow-suspicious to accept "
              "them as lmnet reads them", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("train", help="train a model (paper recipe by default)")
    p.add_argument("--config", default=None, help="YAML config (e.g. configs/kvasir.yaml)")
    p.set_defaults(config_keys=_config_flags(p))
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue a run exactly (its own config; --epochs/--time-budget may change)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any config key; model.KEY=VALUE for model options, e.g. model.width=24")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a run's checkpoint on its test split", formatter_class=fmt)
    p.add_argument("run", nargs="?", default=None, help="run folder or checkpoint file")
    p.add_argument("--weights", default=None, metavar="NAME",
                   help="a pretrained model instead of a run: a shipped name (kvasir), a folder "
                        "or a Hugging Face Hub id org/name")
    p.add_argument("--data", default=None, help="dataset folder (default: the run's)")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    p.add_argument("--split-file", default=None, help="split JSON (default: the run's split.json)")
    p.add_argument("--grid", default="resized", choices=("resized", "original"),
                   help="score at the training size (paper) or at each image's own size")
    p.add_argument("--spacing", type=float, nargs=2, default=None, metavar=("SY", "SX"))
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="inference precision (torch: bf16/fp16 autocast, fp16 on CUDA only; "
                        "openvino: bf16 hint)")
    old_spelling(p, "--engine", "--backend", "engine", choices=ENGINE_CHOICES)
    p.add_argument("--backend", dest="engine", default=None, choices=ENGINE_CHOICES,
                   help="PyTorch, ONNX Runtime or OpenVINO (the model is converted on the fly), or "
                        "auto: the fastest here, measured (default: torch; an exported .onnx or .xml "
                        "RUN runs on its own engine)")
    p.add_argument("--out", default=None, help="report folder (default: RUN/eval_<split>_<grid>)")
    _post_flags(p, predict=False)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="masks, overlays and lesion areas for new images",
                       formatter_class=fmt)
    p.add_argument("items", nargs="+", metavar="CHECKPOINT_AND_INPUTS",
                   help="a checkpoint file or run folder, then image files or folders (with "
                        "--weights: only the images)")
    p.add_argument("--weights", default=None, metavar="NAME",
                   help="a pretrained model: a shipped name (kvasir), a folder or a Hugging Face "
                        "Hub id org/name")
    p.add_argument("--out", required=True, help="output folder")
    _post_flags(p, predict=True)
    p.add_argument("--save-probabilities", nargs="?", const="png", default=None,
                   choices=("png", "npy"), metavar="{png,npy}",
                   help="also write probabilities/NAME.png (16-bit, lesion probability x 65535) or "
                        ".npy (float32), at the image's size, before threshold and clean-up")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out that holds an earlier prediction: masks of the same "
                        "names are replaced, areas.csv keeps the rows of the other masks")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="inference precision (torch: bf16/fp16 autocast, fp16 on CUDA only; "
                        "openvino: bf16 hint); auto: fp32, or bf16 where this CPU has it in "
                        "hardware, it is faster and its masks of the shipped sample agree with "
                        f"fp32's at Dice >= {BF16_AGREEMENT} (mean over the shipped sample's 40 images; measured "
                        "once, with the engine probe)")
    old_spelling(p, "--engine", "--backend", "engine", choices=ENGINE_CHOICES)
    p.add_argument("--backend", dest="engine", default="auto", choices=ENGINE_CHOICES,
                   help="auto: the fastest installed engine for this machine and batch size, "
                        "measured once and cached (delete ~/.cache/lmnet/engines.json to measure "
                        "again); or PyTorch, ONNX Runtime, OpenVINO (CHECKPOINT may then be an "
                        "exported .onnx or .xml file)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per forward pass (decoding and writing overlap it in threads)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a trained model (re-parameterised) to ONNX, OpenVINO "
                       "(fp32 or int8), TorchScript or a pretrained folder", formatter_class=fmt)
    p.add_argument("checkpoint", nargs="?", default=None, help="checkpoint file or run folder")
    p.add_argument("--weights", default=None, metavar="NAME",
                   help="a pretrained model instead: a shipped name (kvasir), a folder or a Hub id")
    p.add_argument("--format", default="onnx", choices=EXPORT_FORMATS,
                   help="onnx, openvino (NAME.xml + NAME.bin), torchscript, or pretrained (a folder "
                        "for lmnet.from_pretrained: config.json, fp16 model.safetensors, README.md)")
    p.add_argument("--out", required=True,
                   help="output file (.onnx, .xml or .pt), or folder (pretrained)")
    p.add_argument("--int8", action="store_true",
                   help="OpenVINO: post-training int8 quantisation (NNCF, the 'openvino' extra), "
                        "calibrated on images of the model's training split")
    p.add_argument("--data", default=None,
                   help="with --int8: the dataset the model was trained on (default: its own)")
    p.add_argument("--calibration-images", type=int, default=None, metavar="N",
                   help="with --int8: how many training images to calibrate on (default: 300)")
    p.add_argument("--no-accuracy-control", action="store_true",
                   help="with --int8: quantise every layer NNCF can (by default layers go back to "
                        "fp32 until the validation split's foreground Dice is within 0.5 points)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("check-data", help="counts, sizes, empty masks and problems of a dataset",
                       formatter_class=fmt)
    p.add_argument("path", help="dataset folder")
    p.add_argument("--format", default=None, choices=FORMATS)
    p.add_argument("--no-read", action="store_true", help="only match files, do not decode them")
    p.add_argument("--allow-suspicious", action="store_true",
                   help="exit 0 even when masks look suspicious (label maps, empty after "
                        "thresholding, all lesion), accepting them as lmnet reads them")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_check_data)
