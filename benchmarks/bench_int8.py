"""int8 variants of a trained LM-Net in OpenVINO: how far each changes the masks, and how fast it
runs (run by hand, not in CI).

    python benchmarks/bench_int8.py --weights kvasir --data ../shared/datasets/kvasir-seg
        [--variants all no-matmul ...] [--calibration-images 300] [--repeats 15]
        [--out benchmarks/results/int8_variants.json]

For each variant (NNCF post-training quantisation, calibrated on images of the model's training
split; which layers stay in fp32 and which NNCF algorithms run), on the model's validation and test
images at the model's size: the agreement of the int8 masks with the fp32 model's (Dice, mean over
images; 1 = the same masks), the change of the foreground Dice against the truth (int8 minus fp32,
points), the number of quantisers, the time NNCF took, and the batch-1 latency (ms, median).
A reference row measures the same for the fp32 model on images with +-1 grey level of random
noise added: how far a perturbation the size of a camera's own noise moves the masks.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import machine, report, time_call  # noqa: E402

from lmnet.data.dataset import SegmentationDataset  # noqa: E402
from lmnet.deploy.convert import cached_openvino_model
from lmnet.deploy.loading import (
    load_model,  # noqa: E402
    stored_split,  # noqa: E402
)
from lmnet.deploy.postprocess import predict_probabilities, probabilities_to_mask
from lmnet.deploy.quantize import calibration_samples, model_inputs  # noqa: E402

VARIANTS = {  # name -> (help, nncf.quantize keyword arguments, built from the nncf module)
    "all": ("every layer NNCF quantises (transformer preset)", lambda n: {}),
    "no-matmul": ("attention matrix products in fp32",
                  lambda n: {"ignored_scope": n.IgnoredScope(types=["MatMul"])}),
    "no-matmul-depthwise": ("attention and depthwise convolutions in fp32", lambda n: {
        "ignored_scope": n.IgnoredScope(types=["MatMul", "GroupConvolution"])}),
    "no-se-head": ("squeeze-excitation blocks and the head in fp32", lambda n: {
        "ignored_scope": n.IgnoredScope(patterns=[r".*\.se\..*", r"__module\.head/.*"])}),
    "bias-correction": ("full bias correction instead of the fast one", lambda n: {
        "fast_bias_correction": False}),
    "no-smoothquant": ("the default (CNN) preset: no SmoothQuant", lambda n: {"model_type": None}),
    "overflow-fix": ("7-bit weights in every layer (no int16 saturation without VNNI)",
                     lambda n: {"advanced_parameters": _advanced("ENABLE")}),
    "no-overflow-fix": ("8-bit weights in every layer, the first included",
                        lambda n: {"advanced_parameters": _advanced("DISABLE")}),
}


def _advanced(overflow_fix: str):
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    return AdvancedQuantizationParameters(overflow_fix=getattr(OverflowFix, overflow_fix))


def items(cfg, data, split, part):
    """``(input (1, C, S, S), true mask (S, S))`` of each image of ``part`` at the model's size."""
    from lmnet.data.layouts import discover

    names = set(split[part])
    samples = [s for s in discover(data, cfg.format or None)[1] if s.name in names]
    ds = SegmentationDataset(samples, cfg.image_size, False, cfg.in_channels, cfg.mean, cfg.std,
                             cache=False)
    return [(x[None].numpy(), y.numpy().astype(bool)) for x, y, _ in (ds[i] for i in range(len(ds)))]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="kvasir", help="pretrained model (name or folder)")
    ap.add_argument("--data", required=True, help="the dataset the model was trained on")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--calibration-images", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/int8_variants.json")
    args = ap.parse_args()

    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    model, cfg = load_model(None, args.weights)
    split = stored_split(None, args.weights)
    if not split:
        sys.exit(f"{args.weights} keeps no train/val/test split: its test images are unknown")
    fp32 = cached_openvino_model(model, cfg.in_channels, cfg.image_size)
    calibration = model_inputs(cfg, calibration_samples(cfg, args.data, split,
                                                        args.calibration_images))
    parts = {p: items(cfg, args.data, split, p) for p in ("val", "test")}
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": args.threads}

    def compiled(m):  # compiled for batch 1 at the model's size, as lmnet's runner does
        m = m.clone()
        m.reshape({m.input(0): ov.PartialShape([1, cfg.in_channels, cfg.image_size,
                                                cfg.image_size])})
        c = core.compile_model(m, "CPU", config)
        return lambda x: c(x)[0]

    def masks(run, items_):  # the binary masks of ``run`` on ``(input, truth)`` items
        return [probabilities_to_mask(predict_probabilities(run, torch.from_numpy(x)))[0]
                .astype(bool) for x, _ in items_]

    def latency(run):
        x = parts["test"][0][0]
        return 1000 * float(np.median(time_call(lambda: run(x), args.repeats, warmup=3)))

    run32 = compiled(fp32)
    ref = {p: masks(run32, parts[p]) for p in parts}
    truth32 = {p: np.mean([dice(m, y) for m, (_, y) in zip(ref[p], parts[p])]) for p in parts}
    rows = [{"variant": "fp32", "what": "no quantisation", "ms": round(latency(run32), 1)}]

    def score(row, masks_of):
        for p in parts:
            m = masks_of(p)
            row[f"agree_{p}"] = round(float(np.mean([dice(a, b) for a, b in zip(m, ref[p])])), 4)
            row[f"change_{p}"] = round(100 * float(
                np.mean([dice(a, y) for a, (_, y) in zip(m, parts[p])]) - truth32[p]), 2)
        return row

    # +-1 grey level of noise, in the model's normalised units
    rng = np.random.default_rng(0)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(1, -1, 1, 1)
    noisy = {p: [(x + rng.integers(-1, 2, x.shape).astype(np.float32) / 255 / std, y)
                 for x, y in parts[p]] for p in parts}

    rows.append(score({"variant": "fp32, +-1 grey level", "what": "reference: input noise"},
                      lambda p: masks(run32, noisy[p])))
    print(rows[-1], flush=True)
    for name in args.variants:
        what, kwargs = VARIANTS[name]
        start = time.time()
        q = nncf.quantize(fp32, nncf.Dataset(calibration), subset_size=len(calibration),
                          **{"model_type": nncf.ModelType.TRANSFORMER, **kwargs(nncf)})
        row = {"variant": name, "what": what, "quantise_s": round(time.time() - start),
               "quantisers": sum(op.get_type_name() == "FakeQuantize" for op in q.get_ops())}
        run8 = compiled(q)
        score(row, lambda p: masks(run8, parts[p]))
        row["ms"] = round(latency(run8), 1)
        rows.append(row)
        print(row, flush=True)
    report(rows, [("variant", "variant"), ("quantisers", "quantisers"),
                  ("agree val", "agree_val"), ("agree test", "agree_test"),
                  ("change val (pts)", "change_val"), ("change test (pts)", "change_test"),
                  ("ms, batch 1", "ms")], args.out, machine(),
           calibration_images=len(calibration), weights=args.weights)


if __name__ == "__main__":
    main()
