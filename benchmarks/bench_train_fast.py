"""Issue 28: LM-Net's training step on the fast path against the stock path, interleaved in one
run (run by hand, not in CI).

    python benchmarks/bench_train_fast.py [--size 256] [--batch 8] [--rounds 4] [--bf16]
                                          [--no-ablations] [--profile] [--isa avx2]
                                          [--out benchmarks/results/train_fast.json]

The stock path is lmnet's training as it was at b5568b3: autograd's backward of neighborhood
attention (``lmnet.layers.neighborhood_attention.FAST_BACKWARD = False``), PyTorch's
BatchNorm modules, summed (``lmnet.layers.fused_norm.NATIVE = False``) and PyTorch's weight
gradient of the depthwise convolutions (``lmnet.layers.depthwise.NATIVE = False``) and PyTorch's
dropout (``lmnet.layers.dropout.NATIVE = False``); all switched by
``lmnet.layers.fast_path.fast_path``. The fast path is today's default. Two more variants
measure what one piece of it adds: the fast path with PyTorch's dropout, with the PyTorch
formulation of neighborhood attention (``NATIVE_TRAINING = False``: its hand-written backward of
the interior instead of the native forward and backward), with PyTorch's LayerNorm
(``lmnet.layers.layer_norm.NATIVE = False``), with PyTorch's GELU after the native BatchNorm sum
(``lmnet.layers.fused_norm.NATIVE_GELU = False``) and with the per-tensor AdamW (the fast path
uses ``lmnet train``'s optimiser, :func:`lmnet.engine.train.adamw`, fused on a CPU; stock the
per-tensor one it used at b5568b3). All train the same model (LM-Net,
channels-last, fp32, AdamW, the paper's loss) on the same random batch; each round takes one
step of every variant in turn, so that a noisy period of this shared machine slows them alike.
The native kernels are built first (their build time, on a fresh cache, is reported: it is paid
once per machine). ``--bf16`` adds the stock and the fast path under bf16 autocast (issue 28,
item 2); ``--no-ablations`` leaves out the variants with one piece of the fast path off (stock
and fast only, and their bf16 twins). ``--profile`` then
profiles one step of the fast path (``torch.profiler``, self CPU time per operation) and keeps
the 15 largest in the JSON, and the 25 largest by operation and input shapes (which layer at
which resolution). ``--isa avx2`` runs every variant as a CPU with AVX2 and no AVX-512 would
(many laptops): PyTorch's kernels (``ATEN_CPU_CAPABILITY``), oneDNN's (``ONEDNN_MAX_CPU_ISA``)
and lmnet's native build (``LMNET_NATIVE_MARCH=x86-64-v3``), on a machine that has more (the
memory and caches stay this machine's).

Prints a table (median seconds per step, images per second, speed-up against stock) and writes
the JSON with the command, the machine and every step's time.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import (  # noqa: E402  (first: oneDNN's cache)
    ISA_LIMITS,
    interleaved_times,
    limit_isa,
    machine,
    report,
)

import lmnet  # noqa: E402
from lmnet.engine.train import adamw  # noqa: E402
from lmnet.layers import dropout, fused_norm, layer_norm  # noqa: E402
from lmnet.layers import neighborhood_attention as na  # noqa: E402
from lmnet.layers.fast_path import fast_path as path  # noqa: E402
from lmnet.losses import SegmentationLoss  # noqa: E402
from lmnet.runtime import keep_freed_memory  # noqa: E402


@contextlib.contextmanager
def switches(fast: bool, hashed_dropout: bool, native_attention: bool, native_norm: bool,
             native_gelu: bool):
    """The fast path (or not), with the hashed-mask dropout only where ``hashed_dropout``, the
    native attention kernels only where ``native_attention``, the native LayerNorm only where
    ``native_norm`` and GELU in the BatchNorm kernel only where ``native_gelu``."""
    with path(fast):
        dropout.NATIVE = fast and hashed_dropout
        na.NATIVE_TRAINING = fast and native_attention
        layer_norm.NATIVE = fast and native_norm
        fused_norm.NATIVE_GELU = fast and native_gelu
        yield


def make_step(fast: bool, bf16: bool, size: int, batch: int, hashed_dropout: bool = True,
              native_attention: bool = True, native_norm: bool = True, native_gelu: bool = True,
              fused_adamw: bool = True):
    torch.manual_seed(0)
    model = lmnet.create_model("lmnet").to(memory_format=torch.channels_last)
    if fast and fused_adamw:  # lmnet train's optimiser
        opt = adamw(model.parameters(), lr=1e-3, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = SegmentationLoss(torch.tensor([0.8, 1.2]), dice_weight=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch, size, size), generator=g)

    def step() -> None:
        ac = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        pieces = (hashed_dropout, native_attention, native_norm, native_gelu)
        with switches(fast, *pieces), ac:
            loss = loss_fn(model(x), y)
        with switches(fast, *pieces):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return step


def build_seconds() -> float:
    """Build the native kernels into a fresh cache: what a machine's first use costs."""
    import subprocess

    with tempfile.TemporaryDirectory() as cache:
        code = ("import time; t = time.perf_counter(); from lmnet.layers.native import native_status; "
                "s = native_status(); assert s['available'], s; print(time.perf_counter() - t)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "LMNET_CACHE_DIR": cache}, check=True)
    return float(done.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true",
                   help="also the stock and the fast path under bf16 autocast")
    p.add_argument("--no-ablations", action="store_true",
                   help="only stock and fast (and with --bf16 their bf16 twins)")
    p.add_argument("--profile", action="store_true", help="profile one step of the fast path")
    p.add_argument("--isa", choices=sorted(ISA_LIMITS), default=None,
                   help="run as a CPU with only this instruction set would")
    p.add_argument("--out", default="benchmarks/results/train_fast.json")
    args = p.parse_args()
    limit_isa(args.isa)
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    built = build_seconds()
    from lmnet.layers.native import native_status

    status = native_status()  # loads the cached build in this process
    print(f"native kernels: {status}; a fresh build took {built:.1f} s")
    # (fast path, bf16 autocast, hashed-mask dropout, native attention training, native
    # LayerNorm, GELU in the BatchNorm kernel, fused AdamW)
    variants = {"stock (b5568b3 path)": (False, False, False, False, False, False, False),
                "fast": (True, False, True, True, True, True, True),
                "fast, PyTorch's dropout": (True, False, False, True, True, True, True),
                "fast, PyTorch's attention": (True, False, True, False, True, True, True),
                "fast, PyTorch's LayerNorm": (True, False, True, True, False, True, True),
                "fast, PyTorch's GELU": (True, False, True, True, True, False, True),
                "fast, per-tensor AdamW": (True, False, True, True, True, True, False)}
    if args.no_ablations:
        variants = {k: v for k, v in variants.items() if k in ("stock (b5568b3 path)", "fast")}
    if args.bf16:
        variants["stock, bf16 autocast"] = (False, True, False, False, False, False, False)
        variants["fast, bf16 autocast"] = (True, True, True, True, True, True, True)
    steps = {name: make_step(fast, bf16, args.size, args.batch, *pieces)
             for name, (fast, bf16, *pieces) in variants.items()}
    t0 = time.perf_counter()
    times = interleaved_times(steps, repeats=args.rounds, per_round=1, warmup=2)
    base = sorted(times["stock (b5568b3 path)"])[len(times["stock (b5568b3 path)"]) // 2]
    rows = []
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        rows.append({"variant": name, "s_per_step": round(med, 3),
                     "images_per_second": round(args.batch / med, 3),
                     "speedup": round(base / med, 3), "steps": [round(t, 3) for t in ts]})
    cols = [("variant", "variant"), ("s / step (median)", "s_per_step"),
            ("img/s", "images_per_second"), ("x stock", "speedup")]
    extra = {}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            steps["fast"]()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        # the same step by operation and input shapes: which layer at which resolution
        shaped = sorted(prof.key_averages(group_by_input_shape=True),
                        key=lambda e: -e.self_cpu_time_total)
        extra["profile_fast_step"] = {
            "self_cpu_seconds_total": round(total / 1e6, 3),
            "top": [{"op": e.key, "self_cpu_seconds": round(e.self_cpu_time_total / 1e6, 3),
                     "share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
                    for e in events[:15]],
            "top_by_shape": [{"op": e.key, "input_shapes": str(e.input_shapes),
                              "self_cpu_seconds": round(e.self_cpu_time_total / 1e6, 3),
                              "share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
                             for e in shaped[:25]]}
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=36,
            max_shapes_column_width=90))
    report(rows, cols, args.out, machine(), size=args.size, batch=args.batch,
           native=status, native_build_seconds_fresh=round(built, 1),
           wall_seconds=round(time.perf_counter() - t0, 1), **extra)


if __name__ == "__main__":
    main()
