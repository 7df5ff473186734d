"""A deployed PyTorch model converted for another runtime: ONNX and TorchScript files, an
``openvino.Model``; the conversions backends need at run time are cached by a digest of the weights."""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmnet._files import atomic_path, cache_dir
from lmnet._optional import require
from lmnet.config import TrainConfig
from lmnet.deploy.metadata import export_metadata

__all__ = ["export_onnx", "export_torchscript", "convert_to_openvino", "cached_openvino_model",
           "cached_onnx_export"]

log = logging.getLogger(__name__)


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
            log.debug("TorchScript-based ONNX export failed (%s); using torch.export", err)
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


def convert_to_openvino(model: nn.Module, in_channels: int = 3, size: int = 256,
                        fused_attention: bool = False) -> Any:
    """An ``openvino.Model`` of a deployed PyTorch model, batch and spatial size dynamic.

    ``fused_attention``: each neighborhood attention becomes one node run by lmnet's kernel
    (:mod:`lmnet.deploy.openvino_ops`; such a model runs only where lmnet is installed); else
    OpenVINO's own operations throughout (what ``lmnet export`` writes).
    """
    ov = require("openvino", "openvino")
    extensions = []
    if fused_attention:
        from lmnet.deploy.openvino_ops import conversion_extensions

        extensions = conversion_extensions()
        # OpenVINO (2026.4) leaves the replaced modules' forward patched after converting: a copy
        # is converted, so that the caller's model still runs (and converts) as PyTorch's
        model = copy.deepcopy(model)
    model.eval()
    example = torch.randn(1, in_channels, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
        source, extensions = _unchecked_trace(model, example, extensions)
        return ov.convert_model(source, example_input=example, extension=extensions or None,
                                input=[ov.PartialShape([-1, in_channels, -1, -1])])


def _unchecked_trace(model: nn.Module, example: torch.Tensor,
                     extensions: list[Any]) -> tuple[Any, list[Any]]:
    """What ``convert_model`` gets for ``model``, and the extensions left for it: OpenVINO's
    TorchScript decoder (what ``convert_model`` builds itself) without the trace check, which
    runs the model again and compares, about 2 s of LM-Net's 7 s of converting (the conversions'
    tests compare the logits). Where this OpenVINO has no such decoder: ``model`` itself."""
    try:
        from openvino.frontend.pytorch import ModuleExtension
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

        modules = {e.module: e for e in extensions if isinstance(e, ModuleExtension)}
        decoder = TorchScriptPythonDecoder(model, example_input=(example,),
                                           module_extensions=modules,
                                           trace_kwargs={"check_trace": False})
    except (ImportError, TypeError) as err:  # another OpenVINO's decoder
        log.debug("OpenVINO's TorchScript decoder not usable (%s): convert_model traces", err)
        return model, extensions
    return decoder, [e for e in extensions if not isinstance(e, ModuleExtension)]


def _model_digest(model: nn.Module, in_channels: int, tool: str) -> str:
    """A digest of what a conversion depends on: the weights, their names and shapes, the model's
    class, the input channels, and the versions of lmnet, PyTorch and the converting ``tool``."""
    import hashlib
    from importlib.metadata import version

    from lmnet._version import __version__

    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}|{in_channels}|"
                       f"{__version__}|{torch.__version__}|{tool} {version(tool)}".encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def cached_openvino_model(model: nn.Module, in_channels: int = 3, size: int = 256,
                          fused_attention: bool = False) -> Any:
    """:func:`convert_to_openvino`, kept in ``cache_dir()/openvino`` so that converting (seconds)
    happens once per model: an IR named by a digest of the weights (:func:`_model_digest`), read
    back on later calls. A cache that cannot be written only costs the conversion."""
    ov = require("openvino", "openvino")
    folder = cache_dir() / "openvino"
    digest = _model_digest(model, in_channels, "openvino")
    xml = folder / (f"{digest}_fused_attention.xml" if fused_attention else f"{digest}.xml")
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        try:
            core = ov.Core()
            if fused_attention:
                from lmnet.deploy.openvino_ops import register

                register(core)
            return core.read_model(str(xml))
        except Exception:  # noqa: BLE001 - a damaged cache entry: convert again
            pass
    ov_model = convert_to_openvino(model, in_channels, size, fused_attention)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(xml, suffix_keep=True) as tmp:  # the .xml last: never one without its .bin
            ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
            tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    except OSError:
        pass
    return ov_model


def cached_onnx_export(model: nn.Module, cfg: TrainConfig) -> Path:
    """The ONNX export of a deployed model, kept in ``cache_dir()/onnx`` under a digest of its
    weights (exporting takes seconds); written to a temporary folder if the cache is not
    writable (ONNX Runtime reads the whole file when its session starts)."""
    import tempfile

    folder = cache_dir() / "onnx"
    path = folder / f"{_model_digest(model, cfg.in_channels, 'onnxruntime')}_{cfg.image_size}.onnx"
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        export_onnx(model, path, cfg.in_channels, cfg.image_size,  # written whole or not at all
                    metadata=export_metadata(cfg))
        return path
    except OSError:
        scratch = Path(tempfile.mkdtemp(prefix="lmnet-onnx-")) / "model.onnx"
        export_onnx(model, scratch, cfg.in_channels, cfg.image_size, metadata=export_metadata(cfg))
        return scratch
