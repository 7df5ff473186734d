"""What keeping freed memory (lmnet.runtime.keep_freed_memory) does, one fresh process per run, as
the lmnet command runs (run by hand, not in CI).

    python benchmarks/bench_malloc.py [--rounds 3] [--out benchmarks/results/malloc.json]

Each run is a new Python process that builds one model, warms it up and times it: inference of the
deployed LM-Net (channels-last, fp32) at batch 1 and batch 8, and the training step (channels-last +
bf16 autocast, AdamW) at batch 8, all at 256 x 256. Runs with glibc's default malloc settings and
with freed memory kept alternate, --rounds times each; the table gives the median over runs of each
run's median ms per image and minor page faults per call, and the ratio default / kept.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, report  # noqa: E402

TASKS = {"inference b1": ("infer", 1, 12), "inference b8": ("infer", 8, 4),
         "training step b8": ("train", 8, 4)}


def worker(task: str, batch: int, calls: int, keep: bool) -> None:
    """Run in the child process: print one JSON line with ms per image and faults per call."""
    import resource

    import torch

    import lmnet
    from lmnet.runtime import keep_freed_memory

    kept = keep_freed_memory() if keep else False
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    if task == "infer":
        model = lmnet.deploy(lmnet.create_model("lmnet")).to(memory_format=torch.channels_last)

        def call() -> None:
            with torch.inference_mode():
                model(x)
    else:
        from lmnet.losses import SegmentationLoss

        model = lmnet.create_model("lmnet").train().to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss_fn = SegmentationLoss(torch.tensor([0.8, 1.2]), dice_weight=1.0)
        y = (torch.rand(batch, 256, 256) > 0.8).long()

        def call() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for _ in range(2):
        call()
    times, faults = [], []
    for _ in range(calls):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3 / batch)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"kept": kept, "ms_per_image": statistics.median(times),
                      "faults_per_call": statistics.median(faults)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/malloc.json")
    ap.add_argument("--worker", nargs=4, metavar=("TASK", "BATCH", "CALLS", "KEEP"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        task, batch, calls, keep = args.worker
        worker(task, int(batch), int(calls), keep == "1")
        return
    results: dict[tuple[str, bool], list[dict]] = {}
    for _ in range(args.rounds):
        for name, (task, batch, calls) in TASKS.items():
            for keep in (False, True):
                out = subprocess.run([sys.executable, __file__, "--worker", task, str(batch),
                                      str(calls), "1" if keep else "0"],
                                     capture_output=True, text=True, check=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((name, keep), []).append(res)
                print(f"{name:<18} {'kept' if keep else 'default':<8} "
                      f"{res['ms_per_image']:8.1f} ms/img  {res['faults_per_call']:8.0f} faults/call",
                      flush=True)
    rows = []
    for name in TASKS:
        row = {"task": name}
        for keep, label in ((False, "default"), (True, "kept")):
            runs = results[(name, keep)]
            row[f"ms_per_image_{label}"] = round(statistics.median(r["ms_per_image"] for r in runs), 1)
            row[f"faults_per_call_{label}"] = int(statistics.median(r["faults_per_call"] for r in runs))
        row["speedup"] = round(row["ms_per_image_default"] / row["ms_per_image_kept"], 2)
        rows.append(row)
    report(rows, [("task", "task"), ("ms/img default", "ms_per_image_default"),
                  ("ms/img kept", "ms_per_image_kept"), ("default / kept", "speedup"),
                  ("faults/call default", "faults_per_call_default"),
                  ("faults/call kept", "faults_per_call_kept")],
           args.out, machine(), rounds=args.rounds,
           runs={f"{n} / {'kept' if k else 'default'}": v for (n, k), v in results.items()})

if __name__ == "__main__":
    main()
