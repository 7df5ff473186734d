"""Inference speed on the CPU: LM-Net engines and variants against the naive reference, and the
registered baselines through the same harness (run by hand, not in CI).

    python benchmarks/bench_infer.py [--size 256] [--batches 1 8] [--no-compile] [--no-baselines]
                                     [--out benchmarks/results/infer.json]

Every row: median and interquartile range of milliseconds per image, images per second, and the
speed-up against the naive reference (training form, fp32 eager PyTorch, attention by gathering
every window) measured in the same run at the same batch size. The rows named "default malloc" run
first, with glibc's default allocator settings; then the script keeps freed memory in the process
(lmnet.runtime.keep_freed_memory, as the lmnet command does) for every other row, the naive
reference measured again included ("vs naive, memory kept"). Within each phase the variants are
timed in interleaved rounds (a few calls of each, in turn), so that a noisy period of the shared
machine slows them alike; the ratios in the "memory kept" column are the robust ones.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import (  # noqa: E402  (first: sets oneDNN's cache before torch loads)
    interleaved_times,
    machine,
    naive_attention,
    report,
    scratch_dir,
    summarize_times,
)

import lmnet  # noqa: E402
from lmnet.deploy.convert import export_onnx  # noqa: E402
from lmnet.runtime import keep_freed_memory  # noqa: E402

BASELINES = ("unet", "basic_unet", "unet_plusplus", "attention_unet", "dynunet", "swin_unetr")



def ort_runner(model: torch.nn.Module, size: int, threads: int, int8: bool = False
               ) -> Callable[[np.ndarray], Any]:
    """ONNX Runtime session on the exported model; ``int8``: static QDQ quantisation first."""
    import onnxruntime as ort

    path = Path(scratch_dir()) / "model.onnx"
    export_onnx(model, path, 3, size)
    if int8:
        path = quantize_int8(path, size)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def quantize_int8(path: Path, size: int) -> Path:
    """Static int8 quantisation (QDQ, per-channel int8 weights, uint8 activations) of Conv, MatMul
    and Gemm, calibrated on 8 random images: enough to time it, not to judge its accuracy."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter({"image": rng.standard_normal((1, 3, size, size), np.float32)}
                              for _ in range(8))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    pre, out = path.with_name("pre.onnx"), path.with_name("int8.onnx")
    quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    return out


def lmnet_variants(size: int, use_compile: bool, threads: int) -> dict[str, Callable[[], Any]]:
    """name -> factory returning ``run(x_tensor)``; built lazily so failures are per row."""
    torch.manual_seed(0)
    train_form = lmnet.create_model("lmnet").eval()
    deployed = lmnet.deploy(copy.deepcopy(train_form))

    def eager(model, channels_last=False, bf16=False):
        m = model.to(memory_format=torch.channels_last) if channels_last else model

        def run(x):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                return m(x)
        return run

    def naive():
        inner = eager(train_form)

        def run(x):
            with naive_attention():
                return inner(x)
        return run

    def compiled(channels_last=False):
        m = copy.deepcopy(deployed)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        return eager(torch.compile(m, dynamic=False), channels_last=channels_last)

    def onnx(int8=False):
        run = ort_runner(deployed, size, threads, int8)
        return lambda x: run(x.numpy())

    # Rows ending in "default malloc" run first, before keep_freed_memory() (see main()).
    variants = {
        "naive reference (train form, gather attention), default malloc": naive,
        "deployed, channels-last, default malloc": lambda: eager(copy.deepcopy(deployed), channels_last=True),
        "naive reference, freed memory kept": naive,
        "train form, eager": lambda: eager(train_form),
        "deployed, eager": lambda: eager(deployed),
        "deployed, channels-last": lambda: eager(copy.deepcopy(deployed), channels_last=True),
        "deployed, bf16 autocast": lambda: eager(deployed, bf16=True),
        "deployed, channels-last + bf16": lambda: eager(copy.deepcopy(deployed), True, True),
        "deployed, ONNX Runtime": onnx,
        "deployed, ONNX Runtime int8 (static QDQ)": lambda: onnx(int8=True),
    }
    if use_compile:
        variants["deployed, torch.compile"] = compiled
        variants["deployed, channels-last + torch.compile"] = lambda: compiled(channels_last=True)
    return variants


def baseline_variants(name: str, size: int, threads: int) -> dict[str, Callable[[], Any]]:
    model = lmnet.create_model(name).eval()

    def eager(channels_last=False):
        m = copy.deepcopy(model).to(memory_format=torch.channels_last) if channels_last else model

        def run(x):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                return m(x)
        return run

    def onnx():
        run = ort_runner(model, size, threads)
        return lambda x: run(x.numpy())

    return {"eager": eager, "channels-last": lambda: eager(True), "ONNX Runtime": onnx}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=15, help="timed calls at batch 1 (fewer at larger)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/infer.json")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    groups = [("lmnet", lmnet_variants(args.size, not args.no_compile, threads))]
    if not args.no_baselines:
        groups += [(b, baseline_variants(b, args.size, threads)) for b in BASELINES]
    entries = [(m, v, f) for m, variants in groups for v, f in variants.items()]
    # Phase 1: the "default malloc" rows; phase 2: every other row, after keep_freed_memory().
    phases = [[e for e in entries if e[1].endswith("default malloc")],
              [e for e in entries if not e[1].endswith("default malloc")]]
    for phase, phase_entries in enumerate(phases):
        if phase == 1:
            keep_freed_memory()  # as the lmnet command does
        runners: dict[tuple[str, str], Callable[[torch.Tensor], Any]] = {}
        for model_name, variant, factory in phase_entries:
            try:
                runners[(model_name, variant)] = factory()
            except Exception as err:  # noqa: BLE001 - a failing engine is a result too
                rows.append({"model": model_name, "variant": variant, "error": str(err)[:200]})
                print(f"{model_name} / {variant}: failed: {str(err)[:200]}", flush=True)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size)
            calls = {}
            for key, run in runners.items():
                try:
                    run(x)  # compiles / builds caches; a failure here is a row too
                    calls[key] = functools.partial(run, x)
                except Exception as err:  # noqa: BLE001
                    rows.append({"model": key[0], "variant": key[1], "batch": batch,
                                 "error": str(err)[:200]})
                    print(f"{key[0]} / {key[1]} b{batch}: failed: {str(err)[:200]}", flush=True)
            repeats = max(3, args.repeats // batch)
            times = interleaved_times(calls, repeats, per_round=min(3, repeats))
            for (model_name, variant), t in times.items():
                stats = summarize_times(t, batch)
                rows.append({"model": model_name, "variant": variant, "batch": batch, **stats})
                print(f"{model_name:<15} {variant:<48} b{batch}: {stats['ms_per_image_median']:8.1f} "
                      f"ms/img  (IQR {stats['ms_per_image_iqr']:.1f})", flush=True)
    order = {(m, v): i for i, (m, v, _) in enumerate(entries)}
    rows.sort(key=lambda r: (order[(r["model"], r["variant"])], r.get("batch", 0)))
    for row in rows:
        if "error" in row:
            continue
        refs = {r["variant"]: r["ms_per_image_median"] for r in rows
                if r.get("batch") == row["batch"] and r["variant"].startswith("naive")
                and "error" not in r}
        ref = refs.get("naive reference (train form, gather attention), default malloc")
        ref_kept = refs.get("naive reference, freed memory kept")
        ms = row["ms_per_image_median"]
        row["speedup_vs_naive"] = round(ref / ms, 2) if ref else None
        row["speedup_vs_naive_memory_kept"] = round(ref_kept / ms, 2) if ref_kept else None
    report(rows, [("model", "model"), ("variant", "variant"), ("batch", "batch"),
                  ("ms/img", "ms_per_image_median"), ("IQR", "ms_per_image_iqr"),
                  ("img/s", "images_per_second"), ("vs naive", "speedup_vs_naive"),
                  ("vs naive, memory kept", "speedup_vs_naive_memory_kept")],
           args.out, machine(), size=args.size)

if __name__ == "__main__":
    main()
