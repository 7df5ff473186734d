"""A model ready for inference: from a checkpoint (or run folder), a pretrained model or an exported
file, on the engine asked for or, with ``engine="auto"``, on the engine a short measurement finds
fastest for this machine, model, precision and batch size (measured once, cached per machine)."""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from lmnet._files import atomic_write_text, cache_dir
from lmnet.config import TrainConfig
from lmnet.data.io import read_image
from lmnet.data.sample import sample_images
from lmnet.deploy.backends import (
    ENGINE_FILES,
    ENGINES,
    PRECISIONS,
    engine_available,
    load_exported,
    make_runner,
    openvino_runner,
    precision_context,
)
from lmnet.deploy.checkpoint import model_from_checkpoint, model_source
from lmnet.deploy.metadata import checkpoint_split, error_line, exported_config
from lmnet.deploy.postprocess import predict_probabilities, probabilities_to_mask
from lmnet.deploy.preprocess import preprocess
from lmnet.deploy.pretrained import from_pretrained, pretrained_train_config, resolve_pretrained
from lmnet.models._hub import read_config
from lmnet.runtime import cpu_name, installed_versions, native_bf16

__all__ = ["ENGINE_CHOICES", "PRECISION_CHOICES", "BF16_AGREEMENT", "Predictor", "choose_engine",
           "load_model", "load_predictor", "mask_agreement", "probe_cache_path", "stored_split",
           "time_runner"]

#: What ``--backend`` accepts: ``auto`` (measured) or one backend.
ENGINE_CHOICES = ("auto", *ENGINES)
#: Precisions each engine runs on a CPU.
_ENGINE_PRECISIONS = {"torch": ("fp32", "bf16"), "onnx": ("fp32",), "openvino": ("fp32", "bf16")}
#: What ``lmnet predict --precision`` accepts: ``auto`` lets the probe consider bf16 too
#: (:func:`choose_engine`).
PRECISION_CHOICES = ("auto", *PRECISIONS)
#: A bf16 candidate of ``precision="auto"`` is used only if its masks of the shipped sample agree
#: with fp32 PyTorch's at least this well (mean Dice over the images).
BF16_AGREEMENT = 0.995
#: Sample images the agreement is measured on (None: all 40).
AGREEMENT_IMAGES: int | None = None


class Predictor(NamedTuple):
    """A loaded model: ``model`` (a PyTorch module, or a function from a numpy batch to numpy
    logits), its training config, the engine it runs on, and how that engine was chosen."""

    model: Any
    cfg: TrainConfig
    engine: str
    note: str = ""
    #: ``fp32`` or ``bf16``: what the engine computes in (PyTorch: the autocast the caller applies)
    precision: str = "fp32"


def load_model(checkpoint: str | Path | None = None, weights: str | Path | None = None
               ) -> tuple[nn.Module, TrainConfig]:
    """The deployed PyTorch model and its training config, from a checkpoint (or run folder) or
    from pretrained ``weights`` (a shipped name, a folder or a Hub id; see
    :func:`lmnet.from_pretrained`). Exactly one of the two."""
    checkpoint, weights = model_source(checkpoint, weights)
    if (checkpoint is None) == (weights is None):
        raise ValueError("give a checkpoint (or run folder) or --weights, not both or neither")
    if weights is not None:
        model = from_pretrained(weights)
        return model, pretrained_train_config(model)
    return model_from_checkpoint(checkpoint)


def stored_split(checkpoint: str | Path | None = None, weights: str | Path | None = None
                 ) -> dict[str, Any] | None:
    """The train/val/test split a model was trained with, where its source keeps it: the run's
    ``split.json`` beside a checkpoint, ``config.json`` of a pretrained folder, or the metadata
    of an exported file; None when it has none."""
    checkpoint, weights = model_source(checkpoint, weights)
    if weights is not None:
        return read_config(resolve_pretrained(weights)).get("split") or None
    return None if checkpoint is None else checkpoint_split(checkpoint)



def load_predictor(checkpoint: str | Path | None = None, engine: str = "torch",
                   weights: str | Path | None = None, precision: str = "fp32",
                   batch_size: int = 1, threads: int | None = None) -> Predictor:
    """A model ready for inference on ``engine`` (see :class:`Predictor`).

    ``checkpoint``: a checkpoint, a run folder, or an exported ``.onnx`` (ONNX Runtime) or ``.xml``
    (OpenVINO) file; or ``weights``: a pretrained model (:func:`load_model`). ``engine``: one of
    :data:`ENGINE_CHOICES`; ``auto`` takes an exported file's own engine, else measures
    (:func:`choose_engine`) at ``batch_size``. ``precision`` is OpenVINO's inference precision
    hint; PyTorch's autocast is applied by the caller (:func:`~lmnet.deploy.backends.precision_context`).
    """
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(ENGINE_CHOICES)}")
    checkpoint, weights = model_source(checkpoint, weights)
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.suffix in ENGINE_FILES:
        wanted = ENGINE_FILES[path.suffix]
        if engine not in ("auto", wanted):
            raise ValueError(f"{path} is an exported {wanted} file: use --backend {wanted}")
        if not path.is_file():
            raise FileNotFoundError(f"no such {wanted} file: {path}")
        if precision == "auto":
            precision = "fp32"
        if precision not in _ENGINE_PRECISIONS[wanted]:
            raise ValueError(f"precision {precision!r} is not available with {wanted}")
        cfg = exported_config(path)  # checks the file first: a clear error for files not ours
        try:
            run = (openvino_runner(path, precision=precision, threads=threads)
                   if wanted == "openvino" else load_exported(path, "onnx", threads))
        except Exception as err:  # noqa: BLE001 - the runtime's own message, first line only
            raise ValueError(f"{path} cannot be loaded by {wanted}: {error_line(err)} (a damaged "
                             f"or incomplete export? export it again with lmnet export)") from None
        check_output_channels(run, cfg, path)
        return Predictor(run, cfg, wanted, f"engine: {wanted} (the file's own), {precision}",
                         precision)
    model, cfg = load_model(checkpoint, weights)
    if engine == "auto" or precision == "auto":
        return choose_engine(model, cfg, batch_size, precision, threads,
                             engines=None if engine == "auto" else (engine,))
    if precision not in _ENGINE_PRECISIONS[engine] and not (engine == "torch" and precision == "fp16"):
        raise ValueError(f"precision {precision!r} is available with --backend "
                         f"{' or '.join(e for e, p in _ENGINE_PRECISIONS.items() if precision in p)}")
    return Predictor(make_runner(model, cfg, engine, precision, threads), cfg, engine, "", precision)


def check_output_channels(run: Any, cfg: TrainConfig, source: str | Path) -> None:
    """Run ``run`` once on a blank image of the config's size: its logits must be finite and have
    the config's ``n_classes`` channels, or the masks would be meaningless (``ValueError``)."""
    import numpy as np

    x = np.zeros((1, cfg.in_channels, cfg.image_size, cfg.image_size), np.float32)
    try:
        logits = np.asarray(run(x))
    except Exception as err:  # noqa: BLE001 - a model that cannot run its own input size
        raise ValueError(f"{source} does not run on a {cfg.in_channels} x {cfg.image_size} x "
                         f"{cfg.image_size} input as its config says: {error_line(err)}") from None
    if logits.ndim != 4 or logits.shape[1] != cfg.n_classes:
        raise ValueError(f"{source} gives logits of shape {tuple(logits.shape)}, but its config "
                         f"says {cfg.n_classes} classes: the file and its lmnet metadata do not "
                         "belong together; export it again with lmnet export")
    if not np.isfinite(logits).all():
        raise ValueError(f"{source} gives NaN or infinite logits on a blank image: its weights are "
                         "damaged or diverged")


def probe_cache_path() -> Path:
    """Where measured engine choices are kept: ``engines.json`` in lmnet's cache folder
    (:func:`~lmnet._files.cache_dir`). Delete it to measure again."""
    return cache_dir() / "engines.json"


def _probe_key(cfg: TrainConfig, batch_size: int, precision: str, threads: int,
               candidates: list[str]) -> str:
    """Everything the fastest engine depends on: machine, threads, library versions, the model
    and its input, batch size and precision."""
    versions = {k: v for k, v in installed_versions("torch", "onnxruntime", "openvino").items() if v}
    return json.dumps({"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": threads,
                       "versions": versions, "engines": candidates, "model": cfg.model,
                       "model_args": cfg.model_args, "in_channels": cfg.in_channels,
                       "n_classes": cfg.n_classes, "size": cfg.image_size, "batch": batch_size,
                       "precision": precision}, sort_keys=True, default=str)


def time_runner(run: Any, engine: str, x: torch.Tensor, precision: str,
                 calls: int = 5, warmup: int = 2, max_seconds: float = 5.0) -> float:
    """Median seconds of one call of ``run`` (an engine's runner) on ``x`` (after ``warmup``
    calls), at most ``calls`` calls or about ``max_seconds`` of them (at least 3): what
    :func:`choose_engine` compares engines by (a seam that tests replace with given times)."""
    if engine == "torch":
        xt = x.contiguous(memory_format=torch.channels_last)

        def call() -> None:
            with torch.inference_mode(), precision_context(precision):
                run(xt)
    else:
        xn = x.numpy()

        def call() -> None:
            run(xn)
    for _ in range(warmup):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < calls and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _candidates(precision: str, engines: tuple[str, ...] | None) -> list[tuple[str, str]]:
    """(engine, precision) pairs worth measuring: installed engines that run ``precision``; for
    ``auto`` every engine's fp32, and its bf16 where the CPU has bf16 in hardware."""
    names = [e for e in (engines or ENGINES) if engine_available(e)]
    if precision != "auto":
        return [(e, precision) for e in names if precision in _ENGINE_PRECISIONS[e]]
    wanted = ("fp32", "bf16") if native_bf16() else ("fp32",)
    return [(e, p) for p in wanted for e in names if p in _ENGINE_PRECISIONS[e]]


def _label(engine: str, precision: str, auto: bool) -> str:
    return f"{engine} {precision}" if auto else engine


def mask_agreement(reference: Any, run: Any, engine: str, precision: str, cfg: TrainConfig,
                   count: int | None = AGREEMENT_IMAGES) -> float:
    """Mean Dice between the lesion masks of ``reference`` (a deployed model or runner computing in
    fp32) and those of ``run`` (``engine`` at ``precision``) on the shipped sample's images (the
    first ``count``; all: None), one at a time at the model's input size; two empty masks agree
    fully."""
    dice = []
    for path in sample_images(count):
        x = preprocess([read_image(path, cfg.in_channels)], cfg.image_size, cfg.mean, cfg.std)
        with torch.inference_mode():
            a = probabilities_to_mask(predict_probabilities(reference, x))
            with precision_context(precision if engine == "torch" else "fp32"):
                b = probabilities_to_mask(predict_probabilities(run, x))
        size = int(a.sum()) + int(b.sum())
        dice.append(1.0 if size == 0 else 2 * int((a & b).sum()) / size)
    return sum(dice) / len(dice)


def choose_engine(model: nn.Module, cfg: TrainConfig, batch_size: int = 1, precision: str = "fp32",
                  threads: int | None = None, refresh: bool = False,
                  engines: tuple[str, ...] | None = None) -> Predictor:
    """The deployed ``model`` on the fastest installed engine that runs ``precision``, measured:
    each candidate runs a batch of ``batch_size`` random images at the model's input size a few
    times, the median decides. The choice is cached per machine and setting
    (:func:`probe_cache_path`), so later calls build only the chosen engine; ``refresh`` measures
    again. The :class:`Predictor`'s ``note`` says what was chosen and why.

    ``precision="auto"``: fp32 in every engine and, on a CPU with bf16 in hardware
    (:func:`~lmnet.runtime.native_bf16`), bf16 where the engine has it; a bf16 candidate that
    is fastest is taken only if its masks agree with fp32's (:func:`mask_agreement` at least
    :data:`BF16_AGREEMENT`), else the next fastest. ``engines``: only these engines."""
    threads = int(threads or torch.get_num_threads())
    auto = precision == "auto"
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cpu":
        return Predictor(model, cfg, "torch", f"engine: torch (the model is on {param.device})",
                         "fp32" if auto else precision)
    candidates = _candidates(precision, engines)
    if not candidates:
        raise ValueError(f"no installed engine runs precision {precision!r} on a CPU")
    if len(candidates) == 1:
        engine, prec = candidates[0]
        hint = "" if engines else " (OpenVINO is often faster: pip install 'lmnet[openvino]')"
        return Predictor(make_runner(model, cfg, engine, prec, threads), cfg, engine,
                         f"engine auto: {_label(engine, prec, auto)}, the only candidate installed "
                         f"for {precision}{hint}", prec)
    key = _probe_key(cfg, batch_size, precision, threads, [_label(*c, True) for c in candidates])
    cache_file = probe_cache_path()
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}  # unreadable or corrupt: measure again and rewrite it
    setting = f"batch {batch_size}, {cfg.image_size} x {cfg.image_size}, {precision}, {threads} threads"
    entry = cache.get(key)
    if (not refresh and isinstance(entry, dict)
            and (entry.get("engine"), entry.get("precision", precision)) in candidates):
        engine, prec = entry["engine"], entry.get("precision", precision)
        note = (f"engine auto: {_label(engine, prec, auto)}, measured fastest on this machine for "
                f"{setting} ({_fmt_ms(entry.get('ms', {}))}{_fmt_agreement(entry)}; cached in {cache_file})")
        return Predictor(make_runner(model, cfg, engine, prec, threads), cfg, engine, note, prec)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    measured: list[tuple[float, str, str, Any]] = []
    timings = {}
    for engine, prec in candidates:
        run = make_runner(model, cfg, engine, prec, threads)
        seconds = time_runner(run, engine, x, prec)
        timings[_label(engine, prec, auto)] = round(seconds * 1000, 2)
        measured.append((seconds, engine, prec, run))
    measured.sort(key=lambda m: m[0])
    # the reference of the agreement: the fastest fp32 candidate (fp32 in any engine)
    reference = next((m[3] for m in measured if m[2] == "fp32"), model)
    agreement: dict[str, float] = {}
    for _, engine, prec, run in measured:
        if prec != "bf16" or not auto:
            break
        agreement[_label(engine, prec, auto)] = round(mask_agreement(reference, run, engine, prec, cfg), 5)
        if agreement[_label(engine, prec, auto)] >= BF16_AGREEMENT:
            break
    del measured  # the engines not chosen
    entry = {"engine": engine, "precision": prec, "ms": timings,
             "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    if agreement:
        entry["bf16_agreement"] = agreement
    cache[key] = entry
    saved = f"cached in {cache_file}"
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(cache, indent=2) + "\n")  # readers: old or new
    except OSError as err:
        saved = f"not cached: {err}"
    note = (f"engine auto: {_label(engine, prec, auto)}, fastest of a probe at {setting} "
            f"({_fmt_ms(timings)}{_fmt_agreement(entry)}; {saved})")
    return Predictor(run, cfg, engine, note, prec)


def _fmt_agreement(entry: dict[str, Any]) -> str:
    """``; bf16 masks vs fp32: openvino bf16 Dice 0.998 (8 sample images)``, if measured."""
    found = entry.get("bf16_agreement") or {}
    if not isinstance(found, dict) or not found:
        return ""
    parts = ", ".join(f"{k} Dice {v:.4f}{'' if v >= BF16_AGREEMENT else ' (too low: not used)'}"
                      for k, v in found.items())
    return f"; bf16 masks vs fp32's on the shipped sample: {parts}"


def _fmt_ms(timings: dict[str, float]) -> str:
    return ", ".join(f"{e} {ms:.1f} ms" for e, ms in sorted(timings.items(), key=lambda kv: kv[1]))
