"""Export a trained model, re-parameterised, to ONNX or TorchScript with dynamic batch and size."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lmnet._files import atomic_path, check_writable_file
from lmnet._optional import require
from lmnet.config import TrainConfig
from lmnet.deploy.checkpoint import model_source, resolve_checkpoint

__all__ = ["EXPORT_FORMATS", "EXPORT_SUFFIXES", "check_export_target", "export_onnx", "export_torchscript", "export_openvino", "export_model",
           "export_checkpoint", "exported_config", "exported_metadata", "load_exported",
           "stored_split"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torchscript", "openvino", "pretrained")
#: The file endings each exported format is written with (a pretrained model is a folder).
EXPORT_SUFFIXES = {"onnx": (".onnx",), "openvino": (".xml",), "torchscript": (".pt", ".pth", ".ts")}
#: What a run folder of ``lmnet train`` holds besides its checkpoints: never an export's output.
_RUN_FILES = ("config.json", "split.json", "env.json", "log.csv", "sessions.jsonl")


def _is_run_folder(folder: Path) -> bool:
    return folder.is_dir() and (any(folder.glob("checkpoint_*.pt"))
                                or ((folder / "config.json").is_file()
                                    and (folder / "log.csv").is_file()))


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
    from lmnet.models._hub import CONFIG_NAME, WEIGHTS_NAME, is_pretrained_folder

    out = Path(out)
    inputs: list[Path] = []
    for source in (checkpoint, weights):
        if source is None:
            continue
        src = Path(source)
        if src.is_dir():
            inputs += [src, *(src / n for n in ("checkpoint_best.pt", "checkpoint_last.pt",
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
        if _is_run_folder(out):
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
    if out.name in _RUN_FILES and _is_run_folder(out.parent):
        raise ValueError(f"--out {out} is a file of the run folder {out.parent}; choose another name")
    check_writable_file(out, "output")
    if sidecar is not None and sidecar.is_dir():
        raise ValueError(f"{sidecar} is a folder; an OpenVINO IR needs that name for its weights")
    return out


def export_onnx(model: nn.Module, path: str | Path, in_channels: int, size: int = 256,
                opset: int = 18, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` (eval mode) as ONNX with input ``image (N, C, H, W)`` and output ``logits``.

    Batch and spatial size are dynamic; H and W must stay multiples of 16 (as for the model).
    ``metadata`` is stored in the file's ``metadata_props``.
    """
    for module in ("onnx", "onnxscript"):
        require(module, "export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with atomic_path(path, suffix_keep=True) as tmp:  # an interrupted export leaves the old file
        _write_onnx(model, tmp, in_channels, size, opset, metadata)
    return path


def _write_onnx(model: nn.Module, path: Path, in_channels: int, size: int, opset: int,
                metadata: dict[str, str] | None) -> None:
    x = torch.randn(2, in_channels, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript-based exporter: seconds for LM-Net, where torch.export takes minutes.
            axes = {0: "batch", 2: "height", 3: "width"}
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": axes, "logits": axes})
        except (TypeError, RuntimeError, ValueError) as err:  # exporter removed or failing
            log.info("TorchScript-based ONNX export failed (%s); using torch.export", err)
            h16 = torch.export.Dim("h16", min=2, max=1024)
            w16 = torch.export.Dim("w16", min=2, max=1024)
            dims = ({0: torch.export.Dim("batch", min=1, max=4096), 2: 16 * h16, 3: 16 * w16},)
            torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=opset,
                              dynamic_shapes=dims, input_names=["image"], output_names=["logits"],
                              external_data=False, verbose=False)
    if metadata:
        import onnx

        proto = onnx.load(str(path))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(path))


def export_torchscript(model: nn.Module, path: str | Path, in_channels: int, size: int = 256) -> Path:
    """Write ``model`` (eval mode) as a traced TorchScript module."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    x = torch.randn(1, in_channels, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
    with atomic_path(path, suffix_keep=True) as tmp:
        traced.save(str(tmp))
    return path


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
    metadata = {"lmnet_config": json.dumps(cfg.to_dict())}
    if split:
        metadata["lmnet_split"] = json.dumps({k: list(split[k]) for k in ("train", "val", "test")})
    if int8_inputs is not None:
        from lmnet.deploy.quantize import MAX_DICE_DROP, WEIGHT_BITS

        metadata["lmnet_int8"] = json.dumps({
            "tool": "nncf", "calibration_images": len(int8_inputs), "calibration_split": "train",
            "weight_bits": WEIGHT_BITS,
            "accuracy_control": None if int8_validation is None else {
                "metric": "foreground Dice, mean over images", "max_drop": MAX_DICE_DROP,
                "validation_split": "val", "validation_images": len(int8_validation)}})
    if fmt == "onnx":
        export_onnx(model, out, cfg.in_channels, cfg.image_size, metadata=metadata)
    elif fmt == "openvino":
        export_openvino(model, out, cfg, metadata, int8_inputs, int8_validation)
    else:
        export_torchscript(model, out, cfg.in_channels, cfg.image_size)
    result: dict[str, Any] = {"path": str(out), "format": fmt,
                              "precision": "int8" if int8_inputs is not None else "fp32"}
    if check:
        s = cfg.image_size
        shapes = [(1, cfg.in_channels, s, s), (2, cfg.in_channels, s + 32, s - 16 if s > 32 else s + 16)]
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
    ``onnx``, ``openvino``, ``torchscript`` (see :func:`export_model`) or ``pretrained`` (a folder
    for ``lmnet.from_pretrained``; see :func:`lmnet.deploy.pretrained.export_pretrained`).

    ``int8`` (OpenVINO): quantise, calibrated on ``calibration_images`` images of the model's
    training split of ``data`` (default: the dataset it was trained on); with
    ``accuracy_control``, layers go back to fp32 until the mean foreground Dice on the validation
    split is within :data:`~lmnet.deploy.quantize.MAX_DICE_DROP` of fp32's.
    """
    from lmnet.deploy.loading import load_model

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    checkpoint, weights = model_source(checkpoint, weights)
    if int8 and fmt != "openvino":
        raise ValueError("int8 quantisation is made for OpenVINO: use --format openvino --int8")
    check_export_target(fmt, out, checkpoint, weights)
    if fmt == "pretrained":
        if weights is not None:
            raise ValueError("the model is already a pretrained folder: copy the folder instead")
        from lmnet.deploy.pretrained import export_pretrained

        return {"path": str(export_pretrained(checkpoint, out)), "format": fmt}
    model, cfg = load_model(checkpoint, weights)
    split = stored_split(checkpoint, weights)
    inputs = validation = None
    if int8:
        from lmnet.deploy import quantize as q

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
    from lmnet.deploy.engines import cached_openvino_model

    ov = require("openvino", "openvino")
    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"an OpenVINO IR is written as NAME.xml (+ NAME.bin), got {path.name}")
    ov_model = cached_openvino_model(model, cfg.in_channels, cfg.image_size)
    if int8_inputs is not None:
        from lmnet.deploy.quantize import quantize_openvino

        ov_model = quantize_openvino(ov_model, int8_inputs, int8_validation)
    info = dict(metadata or {"lmnet_config": json.dumps(cfg.to_dict())})
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


def error_line(err: BaseException) -> str:
    """The line of a runtime's error that says what is wrong (OpenVINO's first lines name only
    its own source file: ``Exception from src/inference/src/cpp/core.cpp:84:``)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))
              and not ln.endswith(".cpp") and not ln.startswith("[ ")]
    return (useful or lines or [type(err).__name__])[0]


def exported_metadata(path: str | Path) -> dict[str, str]:
    """The ``lmnet_*`` entries stored in an exported ``.onnx`` file's metadata or an OpenVINO
    ``.xml`` file's runtime info (a clear error for files lmnet did not write)."""
    path = Path(path)
    if path.suffix == ".xml":
        ov = require("openvino", "openvino")
        try:
            model = ov.Core().read_model(str(path))
        except Exception as err:  # noqa: BLE001 - any parse failure means a bad file
            raise ValueError(f"{path} is not a readable OpenVINO IR: {error_line(err)}") from None
        meta = {key: model.get_rt_info([key]).astype(str)
                for key in ("lmnet_config", "lmnet_split", "lmnet_precision", "lmnet_int8")
                if model.has_rt_info([key])}
        how = "lmnet export --format openvino"
    else:
        onnx = require("onnx", "export")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as err:  # noqa: BLE001 - any parse failure means a bad file
            raise ValueError(f"{path} is not a readable ONNX file: {err}") from None
        meta = {p.key: p.value for p in proto.metadata_props if p.key.startswith("lmnet_")}
        how = "lmnet export"
    if "lmnet_config" not in meta:
        raise ValueError(f"{path} was not exported by lmnet (no lmnet_config metadata); "
                         f"export it with {how}")
    return meta


def exported_config(path: str | Path) -> TrainConfig:
    """The training config stored in an exported ``.onnx`` or OpenVINO ``.xml`` file."""
    return TrainConfig.from_dict(json.loads(exported_metadata(path)["lmnet_config"]))


def stored_split(checkpoint: str | Path | None = None, weights: str | Path | None = None
                 ) -> dict[str, Any] | None:
    """The train/val/test split a model was trained with, where its source keeps it: the run's
    ``split.json`` beside a checkpoint, ``config.json`` of a pretrained folder, or the metadata
    of an exported file; None when it has none."""
    checkpoint, weights = model_source(checkpoint, weights)
    if weights is not None:
        from lmnet.deploy.pretrained import resolve_pretrained
        from lmnet.models._hub import read_config

        return read_config(resolve_pretrained(weights)).get("split") or None
    path = Path(checkpoint) if checkpoint is not None else None
    if path is None:
        return None
    if path.suffix in (".onnx", ".xml"):
        text = exported_metadata(path).get("lmnet_split")
        return json.loads(text) if text else None
    split = resolve_checkpoint(path).parent / "split.json"
    return json.loads(split.read_text()) if split.is_file() else None


def load_exported(path: str | Path, fmt: str, threads: int | None = None
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``numpy (N, C, H, W) float32 -> numpy logits`` running an exported model on
    ``threads`` threads (default: PyTorch's thread count, ``--threads``)."""
    if fmt == "openvino":
        from lmnet.deploy.engines import openvino_runner

        return openvino_runner(path, threads=threads)
    if fmt == "onnx":
        ort = require("onnxruntime", "export")

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    module = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run
