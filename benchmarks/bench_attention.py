"""Share of neighborhood attention in LM-Net's forward pass (run by hand, not in CI).

    python benchmarks/bench_attention.py [--size 256] [--batch 1] [--repeats 10] [--out FILE]

Times the whole forward pass of the deployed model and, in the same runs, every neighborhood
attention call (forward hooks with a wall clock), then prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import lmnet
from lmnet.layers import NeighborhoodAttention2d
from lmnet.runtime import keep_freed_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    ap.add_argument("--default-malloc", action="store_true",
                    help="do not keep freed memory in the process (lmnet.runtime)")
    args = ap.parse_args()
    kept = False if args.default_malloc else keep_freed_memory()

    model = lmnet.deploy(lmnet.create_model("lmnet"))
    x = torch.randn(args.batch, 3, args.size, args.size)
    starts: dict[str, float] = {}
    spent: dict[str, list[float]] = {}

    def pre(name):
        def hook(_m, _inp):
            starts[name] = time.perf_counter()
        return hook

    def post(name):
        def hook(_m, _inp, _out):
            spent.setdefault(name, []).append(time.perf_counter() - starts[name])
        return hook

    names = []
    for name, m in model.named_modules():
        if isinstance(m, NeighborhoodAttention2d):
            names.append(name)
            m.register_forward_pre_hook(pre(name))
            m.register_forward_hook(post(name))

    totals = []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        spent.clear()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(x)
            totals.append(time.perf_counter() - t0)

    total_ms = statistics.median(totals) * 1e3
    rows = []
    for name in names:
        ms = statistics.median(spent[name]) * 1e3
        rows.append({"module": name, "ms": round(ms, 2), "share": round(ms / total_ms, 4)})
    na_ms = sum(r["ms"] for r in rows)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"input {args.batch}x3x{args.size}x{args.size}, deployed LM-Net, fp32 eager, "
          f"freed memory kept: {kept}")
    print(f"{'module':<22}{'ms (median)':>12}{'share':>8}")
    for r in rows:
        print(f"{r['module']:<22}{r['ms']:>12.2f}{r['share']:>8.1%}")
    print(f"{'all attention':<22}{na_ms:>12.2f}{na_ms / total_ms:>8.1%}")
    print(f"{'whole forward':<22}{total_ms:>12.2f}{1:>8.0%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/bench_attention.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("out", "default_malloc")) + (" --default-malloc" if args.default_malloc else ""),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "freed_memory_kept": kept, "forward_ms_median": round(total_ms, 2),
        "attention_ms": round(na_ms, 2), "attention_share": round(na_ms / total_ms, 4),
        "per_module": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
