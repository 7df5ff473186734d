"""Post-training int8 quantisation of a deployed model for OpenVINO with NNCF, calibrated on the
images the model was trained on (never on the images it is tested on)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from lmnet._optional import require
from lmnet.config import TrainConfig
from lmnet.data.dataset import SegmentationDataset
from lmnet.data.io import read_image
from lmnet.data.layouts import Sample, discover
from lmnet.data.splits import check_split
from lmnet.deploy.postprocess import predict_probabilities, probabilities_to_mask
from lmnet.deploy.preprocess import preprocess
from lmnet.metrics import SegmentationEvaluator

__all__ = ["CALIBRATION_IMAGES", "MAX_DICE_DROP", "WEIGHT_BITS", "calibration_samples", "foreground_dice",
           "model_inputs", "quantize_openvino", "validation_items"]

#: Calibration images by default (NNCF's own default subset size).
CALIBRATION_IMAGES = 300
#: Largest loss of mean foreground Dice (absolute) accuracy-controlled quantisation accepts.
MAX_DICE_DROP = 0.005
#: Weight bits of every quantised layer (7: NNCF's overflow fix everywhere, see quantize_openvino).
WEIGHT_BITS = 7
#: Validation images that rank the quantiser groups (which to return to fp32 first).
RANKING_IMAGES = 32


def _split_samples(cfg: TrainConfig, data: str | Path | None, split: dict[str, Any] | None,
                   part: str) -> list[Sample]:
    data = data or cfg.data
    if not data or not Path(data).exists():
        raise FileNotFoundError(f"no dataset at {data!r} to calibrate on: pass --data PATH "
                                "(the images the model was trained on)")
    if not split or not split.get("train"):
        raise ValueError("int8 calibration uses the model's training images, but its split is not "
                         "known (no split.json beside the checkpoint, none in the pretrained "
                         "folder): calibrating on test images would flatter the result")
    _, samples, _ = discover(data, cfg.format or None)
    names = set(check_split(split, samples, "the model's split")[part])
    return [s for s in samples if s.name in names]


def calibration_samples(cfg: TrainConfig, data: str | Path | None, split: dict[str, Any] | None,
                        count: int = CALIBRATION_IMAGES, seed: int = 0) -> list[Sample]:
    """Up to ``count`` images of the ``train`` part of the model's ``split`` (a seeded random
    choice); the split is required, since calibrating on all images would touch the test set."""
    if count < 1:
        raise ValueError(f"the number of calibration images must be at least 1, got {count}")
    train = _split_samples(cfg, data, split, "train")
    rng = np.random.default_rng(seed)
    return [train[i] for i in sorted(rng.permutation(len(train))[:count])]


def model_inputs(cfg: TrainConfig, samples: Sequence[Sample]) -> list[np.ndarray]:
    """Each sample's image as the model takes it, ``(1, C, S, S)`` float32."""
    return [preprocess([read_image(s.image, cfg.in_channels)], cfg.image_size, cfg.mean,
                       cfg.std).numpy() for s in samples]


def validation_items(cfg: TrainConfig, data: str | Path | None, split: dict[str, Any] | None
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(input, true mask at the model's size)`` of every image of the ``val`` part of the split:
    what accuracy-controlled quantisation scores (never the test part)."""
    val = _split_samples(cfg, data, split, "val")
    if not val:
        raise ValueError("the model's split has no validation images to control the accuracy on")
    ds = SegmentationDataset(val, cfg.image_size, False, cfg.in_channels, cfg.mean, cfg.std,
                             cache=False)
    return [(x[None].numpy(), y.numpy().astype(bool)) for x, y, _ in (ds[i] for i in range(len(ds)))]


def foreground_dice(run: Any, items: Iterable[tuple[np.ndarray, np.ndarray]]
                    ) -> tuple[float, list[float]]:
    """Mean over images of the lesion Dice of ``run`` (numpy batch -> logits) on ``items``, and
    the per-image values (what :func:`quantize_openvino` keeps within ``max_drop``)."""
    ev = SegmentationEvaluator(boundary=False)
    for x, true in items:
        prob = predict_probabilities(run, torch.from_numpy(x))
        ev.update(probabilities_to_mask(prob), true[None])
    per_image = [float(r["dice"]) for r in ev.rows]
    return float(np.mean(per_image)), per_image


def quantize_openvino(ov_model: Any, inputs: Sequence[np.ndarray],
                      validation: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
                      max_drop: float = MAX_DICE_DROP) -> Any:
    """An int8 ``openvino.Model`` of ``ov_model`` (fp32): NNCF's post-training quantisation,
    statistics from ``inputs``, fast bias correction, SmoothQuant on the attention's matrix
    products (NNCF's transformer settings; LM-Net has attention blocks), and weights in a 7-bit
    range in every layer (NNCF's overflow fix, :data:`WEIGHT_BITS`).

    Without VNNI (AVX2 and older AVX-512), the CPU's int8 multiply sums pairs of products in 16
    bits, which saturate with full 8-bit weights; NNCF by default narrows only the first layer's.
    Measured on the shipped Kvasir-SEG weights on a Zen 3 (``benchmarks/bench_int8.py``),
    narrowing every layer took the masks' agreement with fp32 from 0.946 to 0.972 (validation) and
    the validation Dice change from -0.94 to -0.02 points. On a VNNI CPU, where 8-bit weights do
    not saturate, the half bit given away costs nothing measurable: on a model-207 Xeon with
    AVX512-VNNI (the same benchmark, the stage-3 weights) agreement 0.977 with 7 bits against
    0.976 with 8, validation Dice change -0.31 against -0.28 points.

    With ``validation`` (inputs and true masks), accuracy-controlled: NNCF returns layers to
    fp32, the most harmful first, until the mean foreground Dice on ``validation`` is within
    ``max_drop`` (absolute) of the fp32 model's.
    """
    nncf = require("nncf", "openvino")
    import logging

    nncf.set_log_level(logging.ERROR)
    from nncf.quantization.advanced_parameters import (
        AdvancedAccuracyRestorerParameters,
        AdvancedQuantizationParameters,
        OverflowFix,
    )

    kwargs = {"subset_size": len(inputs), "model_type": nncf.ModelType.TRANSFORMER}
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
    if validation is None:
        return nncf.quantize(ov_model, nncf.Dataset(list(inputs)), advanced_parameters=advanced,
                             **kwargs)

    def validate(compiled: Any, items: Iterable[tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[float, list[float]]:
        return foreground_dice(lambda x: compiled(x)[0], items)

    # ranking every quantiser group on the whole validation set costs one pass of it per group;
    # a subset ranks them well enough (the drop itself is always measured on the whole set)
    restorer = AdvancedAccuracyRestorerParameters(
        ranking_subset_size=min(len(validation), RANKING_IMAGES))
    return nncf.quantize_with_accuracy_control(
        ov_model, nncf.Dataset(list(inputs)), nncf.Dataset(list(validation)), validate,
        max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
        advanced_quantization_parameters=advanced,
        advanced_accuracy_restorer_parameters=restorer, **kwargs)
