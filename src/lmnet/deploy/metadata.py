"""What lmnet stores inside an exported file (the training config, the split, how it was
quantised) and how it is read back; the one line of a runtime's error worth showing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmnet._optional import require
from lmnet.config import TrainConfig
from lmnet.deploy.checkpoint import resolve_checkpoint
from lmnet.run_folder import RunFolder

__all__ = ["error_line", "export_metadata", "exported_metadata", "exported_config", "checkpoint_split"]


def export_metadata(cfg: TrainConfig, split: dict[str, Any] | None = None,
                    int8: dict[str, Any] | None = None) -> dict[str, str]:
    """The ``lmnet_*`` entries an export writes: ``lmnet_config``, and ``lmnet_split`` (train, val,
    test names) and ``lmnet_int8`` (how it was quantised) where given."""
    metadata = {"lmnet_config": json.dumps(cfg.to_dict())}
    if split:
        metadata["lmnet_split"] = json.dumps({k: list(split[k]) for k in ("train", "val", "test")})
    if int8:
        metadata["lmnet_int8"] = json.dumps(int8)
    return metadata


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


def checkpoint_split(path: str | Path) -> dict[str, Any] | None:
    """The split stored with a checkpoint (the run's ``split.json`` beside it) or an exported file
    (its metadata); None when there is none."""
    path = Path(path)
    if path.suffix in (".onnx", ".xml"):
        text = exported_metadata(path).get("lmnet_split")
        return json.loads(text) if text else None
    return RunFolder(resolve_checkpoint(path).parent).read_split()
