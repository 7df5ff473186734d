"""Export a trained model, re-parameterised, to ONNX, an OpenVINO IR (fp32 or int8), TorchScript or
a pretrained folder, with its config and split inside, checked against PyTorch; the top of
:mod:`lmnet.deploy`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmnet._files import atomic_path, check_writable_file
from lmnet._optional import require
from lmnet.config import TrainConfig
from lmnet.deploy import quantize as q
from lmnet.deploy.backends import load_exported
from lmnet.deploy.checkpoint import model_source
from lmnet.deploy.convert import cached_openvino_model, export_onnx, export_torchscript
from lmnet.deploy.loading import load_model, stored_split
from lmnet.deploy.metadata import export_metadata
from lmnet.models._hub import CONFIG_NAME, WEIGHTS_NAME, is_pretrained_folder
from lmnet.run_folder import RunFolder

__all__ = ["EXPORT_FORMATS", "EXPORT_SUFFIXES", "check_export_target", "export_checkpoint",
           "export_model", "export_openvino"]


EXPORT_FORMATS = ("onnx", "torchscript", "openvino", "pretrained")

#: The file endings each exported format is written with (a pretrained model is a folder).
EXPORT_SUFFIXES = {"onnx": (".onnx",), "openvino": (".xml",), "torchscript": (".pt", ".pth", ".ts")}

def _is_training_checkpoint(path: Path) -> bool:
    """A ``torch.save`` archive (a checkpoint), not a TorchScript module (which holds code)."""
    import zipfile

    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return (any(n.endswith("/data.pkl") or n == "data.pkl" for n in names)
            and not any("/code/" in n or n.startswith("code/") for n in names))


def check_export_target(fmt: str, out: str | Path, checkpoint: str | Path | None = None,
                        weights: str | Path | None = None) -> Path:
    """Refuse (``ValueError``, nothing written) an export output that would overwrite what the
    export reads or a trained model: the input itself, any training checkpoint, a run folder or a
    run folder's own files; a file ending that does not match ``fmt``; a folder given for a file
    format; a non-empty folder that is not a pretrained folder for ``pretrained``."""
    out = Path(out)
    inputs: list[Path] = []
    for source in (checkpoint, weights):
        if source is None:
            continue
        src = Path(source)
        if src.is_dir():
            inputs += [src, *(src / n for n in (*RunFolder.CHECKPOINTS,
                                                 CONFIG_NAME, WEIGHTS_NAME))]
        elif src.exists():
            inputs += [src, src.with_suffix(".bin")] if src.suffix == ".xml" else [src]
    resolved = out.resolve()
    sidecar = resolved.with_suffix(".bin") if fmt == "openvino" else None
    for item in inputs:
        if item.exists() and item.resolve() in (resolved, sidecar):
            raise ValueError(f"--out {out} is the model being exported ({item}): choose another "
                             "output name")
    if fmt == "pretrained":
        if out.suffix.lower() in {x for v in EXPORT_SUFFIXES.values() for x in v}:
            raise ValueError(f"--format pretrained writes a folder; {out} ends in {out.suffix}: "
                             "give a folder name, or the --format of that file ending")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--format pretrained writes a folder, and {out} is a file")
        if RunFolder.holds_run(out):
            raise ValueError(f"--out {out} is a training run folder: a pretrained export would "
                             "replace its config.json; choose a new folder")
        if out.is_dir() and any(out.iterdir()) and not is_pretrained_folder(out):
            raise ValueError(f"--out {out} is a folder holding other files; give a new folder "
                             "(or an earlier pretrained export, which is replaced)")
        check_writable_file(out / CONFIG_NAME, "output")
        return out
    suffixes = EXPORT_SUFFIXES[fmt]
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; --format {fmt} writes a file: "
                         f"{out / ('model' + suffixes[0])}, for instance")
    if out.suffix.lower() not in suffixes:
        raise ValueError(f"--format {fmt} writes a {' or '.join(suffixes)} file, got {out.name}")
    if _is_training_checkpoint(out):
        raise ValueError(f"--out {out} is a training checkpoint: exporting over it would lose the "
                         "trained model; choose another name")
    if out.name in RunFolder.RECORDS and RunFolder.holds_run(out.parent):
        raise ValueError(f"--out {out} is a file of the run folder {out.parent}; choose another name")
    check_writable_file(out, "output")
    if sidecar is not None and sidecar.is_dir():
        raise ValueError(f"{sidecar} is a folder; an OpenVINO IR needs that name for its weights")
    return out


def export_model(model: nn.Module, cfg: TrainConfig, fmt: str, out: str | Path, check: bool = True,
                 split: dict[str, Any] | None = None, int8_inputs: list[np.ndarray] | None = None,
                 int8_validation: list[tuple[np.ndarray, np.ndarray]] | None = None
                 ) -> dict[str, Any]:
    """Export a deployed model to ONNX or an OpenVINO IR (with ``cfg`` and the ``split`` it was
    trained with in the file's metadata) or TorchScript; with ``check``, compare against PyTorch.

    ``int8_inputs`` (OpenVINO only): quantise to int8, calibrated on these preprocessed images,
    accuracy-controlled on ``int8_validation`` if given (see :mod:`lmnet.deploy.quantize`); the
    check then reports the difference without judging it.

    Returns ``{"path", "format", "max_abs_diff", "check_shapes"}``: the largest absolute logit
    difference between the exported model and PyTorch over a few input shapes, other than the
    traced one included.
    """
    if fmt not in ("onnx", "torchscript", "openvino"):
        raise ValueError(f"format must be onnx, torchscript or openvino here, got {fmt!r}")
    if int8_inputs is not None and fmt != "openvino":
        raise ValueError("int8 quantisation is made for OpenVINO: use --format openvino")
    out = Path(out)
    int8 = None if int8_inputs is None else {
        "tool": "nncf", "calibration_images": len(int8_inputs), "calibration_split": "train",
        "weight_bits": q.WEIGHT_BITS,
        "accuracy_control": None if int8_validation is None else {
            "metric": "foreground Dice, mean over images", "max_drop": q.MAX_DICE_DROP,
            "validation_split": "val", "validation_images": len(int8_validation)}}
    metadata = export_metadata(cfg, split, int8)
    if fmt == "onnx":
        export_onnx(model, out, cfg.in_channels, cfg.image_size, metadata=metadata)
    elif fmt == "openvino":
        export_openvino(model, out, cfg, metadata, int8_inputs, int8_validation)
    else:
        export_torchscript(model, out, cfg.in_channels, cfg.image_size)
    result: dict[str, Any] = {"path": str(out), "format": fmt,
                              "precision": "int8" if int8_inputs is not None else "fp32"}
    if check:
        # the training size, and a batch of 2 at another, non-square size the model accepts
        s, m = cfg.image_size, int(getattr(model, "side_multiple", 16))
        shapes = [(1, cfg.in_channels, s, s), (2, cfg.in_channels, s + 2 * m, s - m if s > 2 * m else s + m)]
        run = load_exported(out, fmt)
        diffs = []
        for shape in shapes:
            x = torch.randn(*shape)
            with torch.no_grad():
                ref = model(x).numpy()
            diffs.append(float(np.abs(run(x.numpy()) - ref).max()))
        result.update(max_abs_diff=max(diffs), check_shapes=[list(s) for s in shapes])
    return result


def export_checkpoint(checkpoint: str | Path | None, fmt: str, out: str | Path, check: bool = True,
                      weights: str | Path | None = None, int8: bool = False,
                      data: str | Path | None = None, calibration_images: int | None = None,
                      accuracy_control: bool = True) -> dict[str, Any]:
    """Export a checkpoint's (or run folder's) model, or pretrained ``weights``, in deployed form:
    ``onnx``, ``openvino`` or ``torchscript`` (see :func:`export_model`). (A ``pretrained``
    folder, with its model card, is :func:`lmnet.engine.export.export`'s.)

    ``int8`` (OpenVINO): quantise, calibrated on ``calibration_images`` images of the model's
    training split of ``data`` (default: the dataset it was trained on); with
    ``accuracy_control``, layers go back to fp32 until the mean foreground Dice on the validation
    split is within :data:`~lmnet.deploy.quantize.MAX_DICE_DROP` of fp32's.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    checkpoint, weights = model_source(checkpoint, weights)
    if int8 and fmt != "openvino":
        raise ValueError("int8 quantisation is made for OpenVINO: use --format openvino --int8")
    if fmt == "pretrained":
        raise ValueError("a pretrained folder carries a model card written from the run's records: "
                         "lmnet.engine.export.export (`lmnet export RUN --format pretrained`) "
                         "writes it")
    check_export_target(fmt, out, checkpoint, weights)
    model, cfg = load_model(checkpoint, weights)
    split = stored_split(checkpoint, weights)
    inputs = validation = None
    if int8:
        inputs = q.model_inputs(cfg, q.calibration_samples(
            cfg, data, split, calibration_images or q.CALIBRATION_IMAGES))
        validation = q.validation_items(cfg, data, split) if accuracy_control else None
    result = export_model(model, cfg, fmt, out, check, split, inputs, validation)
    if inputs is not None:
        result["calibration_images"] = len(inputs)
        result["validation_images"] = len(validation) if validation is not None else 0
    return result


def export_openvino(model: nn.Module, path: str | Path, cfg: TrainConfig,
                    metadata: dict[str, str] | None = None,
                    int8_inputs: list[np.ndarray] | None = None,
                    int8_validation: list[tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """Write ``model`` as an OpenVINO IR (``path`` ``.xml`` and its ``.bin``; fp32 weights, or
    int8 with ``int8_inputs`` to calibrate on), batch and size dynamic, with ``metadata``
    (default: ``cfg`` as ``lmnet_config``) in the IR's runtime info."""
    ov = require("openvino", "openvino")
    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"an OpenVINO IR is written as NAME.xml (+ NAME.bin), got {path.name}")
    ov_model = cached_openvino_model(model, cfg.in_channels, cfg.image_size)
    if int8_inputs is not None:
        ov_model = q.quantize_openvino(ov_model, int8_inputs, int8_validation)
    info = dict(metadata or export_metadata(cfg))
    info["lmnet_precision"] = "int8" if int8_inputs is not None else "fp32"
    for key, value in info.items():
        ov_model.set_rt_info(value, [key])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix_keep=True) as tmp:  # NAME.xml and NAME.bin, both or neither
        try:
            ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
            tmp.with_suffix(".bin").replace(path.with_suffix(".bin"))
        finally:
            tmp.with_suffix(".bin").unlink(missing_ok=True)
    return path
