"""Training throughput on the CPU (forward + backward + AdamW step) for LM-Net variants against the
naive reference, and the loss curve of each variant's first steps against fp32 eager PyTorch
(run by hand, not in CI).

    python benchmarks/bench_train.py [--size 256] [--batch 8] [--repeats 4]
                                     [--curve-steps 50] [--curve-size 64] [--no-compile]
                                     [--out benchmarks/results/train.json]

Speed: median and interquartile range of ms per image over timed steps, images per second, speed-up
against the naive reference (training form, fp32 eager, attention by gathering every window)
measured in the same run. Loss curves: every variant starts from the same weights and sees the
same batches of real Kvasir-SEG images (../shared/datasets, else synthetic discs) with the paper's
augmentation; the table compares its loss curve with fp32 eager: the largest relative difference
over the first 10 steps, and the mean relative difference over all --curve-steps steps.
Stated tolerance: 2 % and 10 %. (Training is chaotic: rounding differences, even of channels-last
summation order alone, grow over the steps, so a later step-by-step match is not expected.)

The first rows run with glibc's default malloc settings; then the script keeps freed memory in the
process (lmnet.runtime.keep_freed_memory, as the lmnet command does) for the rest, the naive
reference included. Within each phase the variants take their timed steps in interleaved rounds
(one step of each in turn), so that a noisy period of this shared machine slows them alike.
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
    summarize_times,
)

import lmnet  # noqa: E402
from lmnet.losses import SegmentationLoss  # noqa: E402
from lmnet.runtime import keep_freed_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KVASIR = ROOT.parent / "shared" / "datasets" / "kvasir-seg"


class Variant:
    """How a training step runs: memory format, autocast dtype, compilation, attention."""

    def __init__(self, channels_last: bool = False, bf16: bool = False, compile: bool = False,
                 naive: bool = False, default_malloc: bool = False) -> None:
        self.channels_last, self.bf16, self.compile, self.naive = channels_last, bf16, compile, naive
        # default_malloc: measured before lmnet.runtime.keep_freed_memory() is called
        self.default_malloc = default_malloc

    def make_step(self, model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], float]:
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        net = torch.compile(model) if self.compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        loss_fn = SegmentationLoss(torch.tensor([0.8, 1.2]), dice_weight=1.0)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ac = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
            na = naive_attention() if self.naive else contextlib.nullcontext()
            with na, ac:
                loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())
        return step


# The variants marked default_malloc run first, with glibc's default allocator settings; then the
# benchmark calls lmnet.runtime.keep_freed_memory() (as the lmnet command does) for all the others.
VARIANTS = {
    "naive reference (gather attention)": Variant(naive=True, default_malloc=True),
    "channels-last + bf16, default malloc": Variant(channels_last=True, bf16=True, default_malloc=True),
    "naive reference, freed memory kept": Variant(naive=True),
    "eager fp32": Variant(),
    "channels-last": Variant(channels_last=True),
    "bf16 autocast": Variant(bf16=True),
    "channels-last + bf16": Variant(channels_last=True, bf16=True),
    "torch.compile": Variant(compile=True),
    "channels-last + torch.compile": Variant(channels_last=True, compile=True),
}


def curve_batches(steps: int, batch: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` fixed training batches of real images (augmented, seeded), or synthetic discs."""
    if KVASIR.is_dir():
        from lmnet.data.dataset import SegmentationDataset
        from lmnet.data.layouts import discover

        samples = discover(KVASIR)[1][: 4 * batch]
        ds = SegmentationDataset(samples, size, train=True, seed=0)
        out = []
        for s in range(steps):
            ds.set_epoch(s)
            idx = np.random.default_rng(s).choice(len(ds), batch, replace=False)
            items = [ds[int(i)] for i in idx]
            out.append((torch.stack([t[0] for t in items]), torch.stack([t[1] for t in items])))
        return out
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(steps):
        c = torch.randint(size // 4, 3 * size // 4, (batch, 2), generator=g)
        y = (((yy - c[:, :1, None]) ** 2 + (xx - c[:, 1:, None]) ** 2) < (size // 6) ** 2).long()
        x = torch.randn(batch, 3, size, size, generator=g) * 0.3 + y[:, None].float()
        out.append((x, y))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--curve-steps", type=int, default=50)
    ap.add_argument("--curve-size", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/train.json")
    args = ap.parse_args()
    variants = {k: v for k, v in VARIANTS.items() if not (args.no_compile and v.compile)}
    torch.manual_seed(0)
    init = lmnet.create_model("lmnet", drop=0.0)  # no dropout: curves comparable step by step
    rows: list[dict[str, Any]] = []
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = (torch.rand(args.batch, args.size, args.size) > 0.8).long()
    phases = [{k: v for k, v in variants.items() if v.default_malloc},
              {k: v for k, v in variants.items() if not v.default_malloc}]
    for phase, phase_variants in enumerate(phases):
        if phase == 1:
            keep_freed_memory()  # as the lmnet command does
        steps = {}
        for name, variant in phase_variants.items():
            try:
                step = variant.make_step(copy.deepcopy(init).train())
                step(x, y)  # a failure here is a row too
                steps[name] = functools.partial(step, x, y)
            except Exception as err:  # noqa: BLE001 - a failing variant is a result too
                rows.append({"variant": name, "error": str(err)[:200]})
                print(f"{name}: failed: {str(err)[:200]}", flush=True)
        # Interleaved rounds, one step of each variant in turn: noise hits all alike.
        for name, t in interleaved_times(steps, args.repeats, per_round=1, warmup=1).items():
            stats = summarize_times(t, args.batch)
            rows.append({"variant": name, **stats})
            print(f"{name:<40} {stats['ms_per_image_median']:8.1f} ms/img", flush=True)
    ref_ms = next((r["ms_per_image_median"] for r in rows if r["variant"].startswith("naive")
                   and variants[r["variant"]].default_malloc and "error" not in r), None)
    ref_kept_ms = next((r["ms_per_image_median"] for r in rows if r["variant"].startswith("naive")
                        and not variants[r["variant"]].default_malloc and "error" not in r), None)
    order = list(variants)
    rows.sort(key=lambda r: order.index(r["variant"]))
    for r in rows:
        if "error" not in r:
            ms = r["ms_per_image_median"]
            r["speedup_vs_naive"] = round(ref_ms / ms, 2) if ref_ms else None
            r["speedup_vs_naive_memory_kept"] = round(ref_kept_ms / ms, 2) if ref_kept_ms else None

    batches = curve_batches(args.curve_steps, args.batch, args.curve_size)
    curves: dict[str, list[float]] = {}
    for name, variant in variants.items():
        if variant.naive or variant.default_malloc:
            continue
        try:
            step = variant.make_step(copy.deepcopy(init).train())
            curves[name] = [step(bx, by) for bx, by in batches]
        except Exception as err:  # noqa: BLE001
            print(f"{name}: curve failed: {str(err)[:200]}", flush=True)
    ref = np.asarray(curves["eager fp32"])
    for r in rows:
        if r["variant"] in curves:
            c = np.asarray(curves[r["variant"]])
            rel = np.abs(c - ref) / np.abs(ref)
            r["curve_first10_max_rel_diff"] = round(float(rel[:10].max()), 4)
            r["curve_mean_rel_diff"] = round(float(rel.mean()), 4)
            r["curve_last10_mean_loss"] = round(float(c[-10:].mean()), 4)
            r["curve_within_tolerance"] = bool(rel[:10].max() < 0.02 and rel.mean() < 0.10)
    curve = {"steps": args.curve_steps, "size": args.curve_size,
             "data": "kvasir-seg" if KVASIR.is_dir() else "synthetic", "losses": curves}
    report(rows, [("variant", "variant"), ("ms/img", "ms_per_image_median"),
                  ("IQR", "ms_per_image_iqr"), ("img/s", "images_per_second"),
                  ("vs naive", "speedup_vs_naive"),
                  ("vs naive, memory kept", "speedup_vs_naive_memory_kept"),
                  ("curve: max rel. diff, steps 1-10", "curve_first10_max_rel_diff"),
                  ("mean rel. diff", "curve_mean_rel_diff"),
                  ("last-10 loss", "curve_last10_mean_loss"),
                  ("within tolerance", "curve_within_tolerance")],
           args.out, machine(), size=args.size, batch=args.batch, curve=curve)

if __name__ == "__main__":
    main()
