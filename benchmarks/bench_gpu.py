"""GPU speed and agreement of LM-Net (run by hand on a CUDA machine, not in CI).

    python benchmarks/bench_gpu.py [--size 256] [--batches 1 8 32] [--train-batch 32]
                                   [--no-compile] [--out benchmarks/results/gpu.json]

Inference: median and interquartile ms per image for the naive reference (training form, fp32,
attention by gathering every window), the training form, the deployed model in fp32, channels-last,
fp16 and bf16 autocast, CUDA-graph replay and torch.compile, and the U-Net and MONAI BasicUNet baselines, each at
every batch size; speed-up against the naive reference at the same batch size. Training step
(forward + backward + AdamW): the naive reference, fp32, fp16 autocast with a gradient scaler and
bf16 autocast, at --train-batch. Agreement: the largest logit difference of each reduced-precision
or compiled variant from the deployed fp32 model, and of the deployed model from the training form,
on the same input.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import naive_attention, report, summarize_times, time_call  # noqa: E402

import lmnet  # noqa: E402
from lmnet.losses import SegmentationLoss  # noqa: E402


def synced(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def gpu_machine() -> dict[str, Any]:
    import platform
    import time

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(), "lmnet": lmnet.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def inference_variants(use_compile: bool) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """name -> (model, run(x)); models on the GPU in eval mode."""
    torch.manual_seed(0)
    train_form = lmnet.create_model("lmnet").eval().cuda()
    deployed = lmnet.deploy(copy.deepcopy(train_form))
    deployed_cl = copy.deepcopy(deployed).to(memory_format=torch.channels_last)

    def eager(model, dtype=None, channels_last=False, naive=False):
        def run(x):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ac = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
            na = naive_attention() if naive else contextlib.nullcontext()
            with torch.inference_mode(), ac, na:
                return model(x).float()
        return run

    def graphed(model, dtype=None):
        """Replay of a CUDA graph captured once per input shape: no per-kernel launch cost."""
        state: dict[str, Any] = {}

        def run(x):
            if state.get("shape") != x.shape:
                static_x = x.clone()
                ac = (torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype
                      else contextlib.nullcontext())
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.inference_mode(), ac:
                    for _ in range(3):
                        model(static_x)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.inference_mode(), ac, torch.cuda.graph(graph):
                    static_out = model(static_x)
                state.update(shape=x.shape, x=static_x, out=static_out, graph=graph)
            state["x"].copy_(x)
            state["graph"].replay()
            return state["out"].float()
        return run

    variants = {
        "lmnet naive reference (train form, gather attention)": eager(train_form, naive=True),
        "lmnet train form, fp32": eager(train_form),
        "lmnet deployed, fp32": eager(deployed),
        "lmnet deployed, channels-last fp32": eager(deployed_cl, channels_last=True),
        "lmnet deployed, fp16 autocast": eager(deployed, torch.float16),
        "lmnet deployed, bf16 autocast": eager(deployed, torch.bfloat16),
        "lmnet deployed, channels-last fp16": eager(deployed_cl, torch.float16, True),
        "lmnet deployed, CUDA graph fp32": graphed(deployed),
        "lmnet deployed, CUDA graph fp16": graphed(deployed, torch.float16),
    }
    if use_compile:
        compiled = torch.compile(copy.deepcopy(deployed))
        variants["lmnet deployed, torch.compile fp32"] = eager(compiled)
        variants["lmnet deployed, torch.compile fp16"] = eager(compiled, torch.float16)
    for name in ("unet", "basic_unet"):
        model = lmnet.create_model(name).eval().cuda()
        variants[f"{name}, fp32"] = eager(model)
        variants[f"{name}, fp16 autocast"] = eager(model, torch.float16)
    return variants


def train_step(dtype: torch.dtype | None, naive: bool, batch: int, size: int
               ) -> Callable[[], float]:
    torch.manual_seed(0)
    model = lmnet.create_model("lmnet").train().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    loss_fn = SegmentationLoss(torch.tensor([0.8, 1.2]).cuda(), dice_weight=1.0)
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = (torch.rand(batch, size, size, device="cuda") > 0.8).long()

    def step() -> float:
        ac = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
        na = naive_attention() if naive else contextlib.nullcontext()
        with ac, na:
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    rows: list[dict[str, Any]] = []
    variants = inference_variants(not args.no_compile)
    x_check = torch.randn(2, 3, args.size, args.size, device="cuda")
    ref_logits = variants["lmnet deployed, fp32"](x_check)
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size, device="cuda")
        naive_ms = None
        for name, run in variants.items():
            try:
                stats = summarize_times(time_call(synced(lambda: run(x)), args.repeats, warmup=3),
                                        batch)
            except Exception as err:  # noqa: BLE001 - a failing variant is a result too
                rows.append({"part": "inference", "variant": name, "batch": batch,
                             "error": f"{type(err).__name__}: {str(err)[:300]}"})
                print(f"{name}: failed: {rows[-1]['error'][:200]}", flush=True)
                continue
            ms = stats["ms_per_image_median"]
            naive_ms = ms if "naive" in name else naive_ms
            row = {"part": "inference", "variant": name, "batch": batch, **stats,
                   "speedup_vs_naive": round(naive_ms / ms, 2)}
            if name.startswith("lmnet") and batch == args.batches[0]:
                row["max_abs_logit_diff_vs_deployed_fp32"] = float(
                    (run(x_check) - ref_logits).abs().max())
            rows.append(row)
            print(f"{name:<54} b{batch:<3} {ms:8.3f} ms/img  x{row['speedup_vs_naive']}", flush=True)
    naive_ms = None
    for name, dtype, naive in [("train step, naive reference fp32", None, True),
                               ("train step, fp32", None, False),
                               ("train step, fp16 autocast + grad scaler", torch.float16, False),
                               ("train step, bf16 autocast", torch.bfloat16, False)]:
        torch.cuda.reset_peak_memory_stats()
        step = train_step(dtype, naive, args.train_batch, args.size)
        stats = summarize_times(time_call(synced(step), 10, warmup=3), args.train_batch)
        ms = stats["ms_per_image_median"]
        naive_ms = ms if naive else naive_ms
        rows.append({"part": "training", "variant": name, "batch": args.train_batch, **stats,
                     "speedup_vs_naive": round(naive_ms / ms, 2),
                     "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
        print(f"{name:<54} b{args.train_batch:<3} {ms:8.3f} ms/img  x{rows[-1]['speedup_vs_naive']}",
              flush=True)
    report(rows, [("part", "part"), ("variant", "variant"), ("batch", "batch"),
                  ("ms/img", "ms_per_image_median"), ("IQR", "ms_per_image_iqr"),
                  ("img/s", "images_per_second"), ("vs naive", "speedup_vs_naive"),
                  ("max |logit diff|", "max_abs_logit_diff_vs_deployed_fp32")],
           args.out, gpu_machine(), size=args.size)

if __name__ == "__main__":
    main()
