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

from lmnet._optional import require
from lmnet.config import TrainConfig
from lmnet.deploy.checkpoint import model_from_checkpoint

__all__ = ["EXPORT_FORMATS", "export_onnx", "export_torchscript", "export_openvino", "export_model",
           "export_checkpoint", "exported_config", "load_exported", "onnx_config"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torchscript", "openvino", "pretrained")


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
    return path


def export_torchscript(model: nn.Module, path: str | Path, in_channels: int, size: int = 256) -> Path:
    """Write ``model`` (eval mode) as a traced TorchScript module."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    x = torch.randn(1, in_channels, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
    traced.save(str(path))
    return path


def export_model(model: nn.Module, cfg: TrainConfig, fmt: str, out: str | Path, check: bool = True
                 ) -> dict[str, Any]:
    """Export a deployed model to ONNX (with ``cfg`` in its metadata) or TorchScript; with
    ``check``, compare against PyTorch.

    Returns ``{"path", "format", "max_abs_diff", "check_shapes"}``: the largest absolute logit
    difference between the exported model and PyTorch over a few input shapes, other than the
    traced one included.
    """
    if fmt not in ("onnx", "torchscript", "openvino"):
        raise ValueError(f"format must be onnx, torchscript or openvino here, got {fmt!r}")
    out = Path(out)
    if fmt == "onnx":
        export_onnx(model, out, cfg.in_channels, cfg.image_size,
                    metadata={"lmnet_config": json.dumps(cfg.to_dict())})
    elif fmt == "openvino":
        export_openvino(model, out, cfg)
    else:
        export_torchscript(model, out, cfg.in_channels, cfg.image_size)
    result: dict[str, Any] = {"path": str(out), "format": fmt}
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


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, check: bool = True
                      ) -> dict[str, Any]:
    """Export a checkpoint's (or run folder's) model in deployed form: ``onnx``, ``torchscript``
    (see :func:`export_model`) or ``pretrained`` (a folder for ``lmnet.from_pretrained``; see
    :func:`lmnet.deploy.pretrained.export_pretrained`)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    if fmt == "pretrained":
        from lmnet.deploy.pretrained import export_pretrained

        return {"path": str(export_pretrained(checkpoint, out)), "format": fmt}
    model, cfg = model_from_checkpoint(checkpoint)
    return export_model(model, cfg, fmt, out, check)


def export_openvino(model: nn.Module, path: str | Path, cfg: TrainConfig) -> Path:
    """Write ``model`` as an OpenVINO IR (``path`` ``.xml`` and its ``.bin``; fp32 weights), batch
    and size dynamic, with ``cfg`` in the IR's runtime info."""
    from lmnet.deploy.engines import convert_to_openvino

    ov = require("openvino", "openvino")
    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"an OpenVINO IR is written as NAME.xml (+ NAME.bin), got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    ov_model = convert_to_openvino(model, cfg.in_channels, cfg.image_size)
    ov_model.set_rt_info(json.dumps(cfg.to_dict()), ["lmnet_config"])
    ov.save_model(ov_model, str(path), compress_to_fp16=False)
    return path


def exported_config(path: str | Path) -> TrainConfig:
    """The training config stored in an exported ``.onnx`` or OpenVINO ``.xml`` file."""
    path = Path(path)
    if path.suffix != ".xml":
        return onnx_config(path)
    ov = require("openvino", "openvino")
    try:
        model = ov.Core().read_model(str(path))
    except Exception as err:  # noqa: BLE001 - any parse failure means a bad file
        raise ValueError(f"{path} is not a readable OpenVINO IR: {str(err).splitlines()[0]}") from None
    if not model.has_rt_info(["lmnet_config"]):
        raise ValueError(f"{path} was not exported by lmnet (no lmnet_config); export it with "
                         "lmnet export --format openvino")
    return TrainConfig.from_dict(json.loads(model.get_rt_info(["lmnet_config"]).astype(str)))


def onnx_config(path: str | Path) -> TrainConfig:
    """The training config stored in an ONNX file written by :func:`export_checkpoint`."""
    onnx = require("onnx", "export")

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - any parse failure means a bad file
        raise ValueError(f"{path} is not a readable ONNX file: {err}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if "lmnet_config" not in meta:
        raise ValueError(f"{path} was not exported by lmnet (no lmnet_config metadata); "
                         "export it with lmnet export")
    return TrainConfig.from_dict(json.loads(meta["lmnet_config"]))


def load_exported(path: str | Path, fmt: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``numpy (N, C, H, W) float32 -> numpy logits`` running an exported model."""
    if fmt == "openvino":
        from lmnet.deploy.engines import openvino_runner

        return openvino_runner(path)
    if fmt == "onnx":
        ort = require("onnxruntime", "export")

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    module = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run
