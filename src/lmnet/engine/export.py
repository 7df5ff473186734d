"""``lmnet export``: a trained model in deployed form, as a file for a backend (ONNX, OpenVINO fp32
or int8, TorchScript) or as a pretrained folder with its model card."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmnet.deploy.checkpoint import model_source
from lmnet.deploy.export import EXPORT_FORMATS, check_export_target, export_checkpoint
from lmnet.engine.model_card import export_with_card

__all__ = ["ExportConfig", "export", "describe_export"]


@dataclass
class ExportConfig:
    """What ``lmnet export`` writes; its flags are these fields."""

    checkpoint: str | None = field(default=None, metadata={"positional": "?"})  # checkpoint file or run folder
    weights: str | None = field(default=None, metadata={"metavar": "NAME", "help": (
        "a pretrained model instead: a shipped name (kvasir), a folder or a Hub id")})
    format: str = field(default="onnx", metadata={"choices": EXPORT_FORMATS, "help": (
        "onnx, openvino (NAME.xml + NAME.bin), torchscript, or pretrained (a folder for "
        "lmnet.from_pretrained: config.json, fp16 model.safetensors, README.md model card)")})
    out: str = field(default="", metadata={"required": True})  # output file (.onnx, .xml or .pt), or folder (pretrained)
    int8: bool = field(default=False, metadata={"help": (
        "OpenVINO: post-training int8 quantisation (NNCF, the 'openvino' extra), calibrated on "
        "images of the model's training split")})
    data: str | None = None             # with --int8: the dataset the model was trained on (default: its own)
    calibration_images: int | None = field(default=None, metadata={"metavar": "N"})  # with --int8: training images to calibrate on (default: 300)
    accuracy_control: bool = field(default=True, metadata={"help": (
        "with --int8: quantise every layer NNCF can (by default layers go back to fp32 until the "
        "validation split's foreground Dice is within 0.5 points)")})
    check: bool = field(default=True, metadata={"help": "skip the comparison with PyTorch"})


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Export as ``cfg`` says; nothing is written when a check fails. Returns what was written:
    ``path``, ``format`` and, for a file, the check against PyTorch and the int8 calibration."""
    if (cfg.checkpoint is None) == (cfg.weights is None):
        raise ValueError("give a checkpoint (or run folder) or --weights NAME, not both or neither")
    if not cfg.out:
        raise ValueError("give the output (--out)")
    checkpoint, weights = model_source(cfg.checkpoint, cfg.weights)
    check_export_target(cfg.format, cfg.out, checkpoint, weights)  # before anything is written
    if cfg.format == "pretrained":
        if weights is not None:
            raise ValueError(f"{weights} is already a pretrained model: copy its folder instead")
        return {"path": str(export_with_card(checkpoint, cfg.out)), "format": cfg.format}
    if (cfg.data is not None or cfg.calibration_images is not None
            or not cfg.accuracy_control) and not cfg.int8:
        raise ValueError("--data, --calibration-images and --no-accuracy-control are for --int8")
    return export_checkpoint(checkpoint, cfg.format, cfg.out, check=cfg.check, weights=weights,
                             int8=cfg.int8, data=cfg.data,
                             calibration_images=cfg.calibration_images,
                             accuracy_control=cfg.accuracy_control)


def describe_export(cfg: ExportConfig, result: dict[str, Any]) -> list[str]:
    """What :func:`export` wrote, in lines for the user."""
    path = result["path"]
    if result["format"] == "pretrained":
        return [f"wrote {Path(path)}/ (config.json, model.safetensors, README.md model card): load "
                f"it with lmnet.from_pretrained({str(path)!r}) or --weights {path}"]
    how = "re-parameterised"
    if cfg.int8:
        how = f"int8, calibrated on {result['calibration_images']} training images"
        if result["validation_images"]:
            how += (f", fp32 layers kept where needed to stay within 0.5 points of fp32's Dice on "
                    f"{result['validation_images']} validation images")
    lines = [f"wrote {path} ({cfg.format}, {how}, dynamic batch and size)"]
    if "max_abs_diff" in result:
        lines.append(f"largest logit difference to PyTorch on shapes {result['check_shapes']}: "
                     f"{result['max_abs_diff']:.2e}")
    return lines
