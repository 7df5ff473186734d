"""Issue 28, item 4: a training step and a prediction while another process keeps one core busy
(run by hand, not in CI).

    python benchmarks/bench_busy.py [--size 256] [--batch 8] [--rounds 2]
                                    [--out benchmarks/results/busy.json]

Each round times, in turn: the quiet machine (2 threads); then, with a child process spinning on
one core, PyTorch's 2 threads fixed, and lmnet's ThreadGovernor (as ``lmnet train`` and
``lmnet predict`` run it: it looks at the other processes' CPU time and sets the threads to the
free cores); then the spinner stops. Training: LM-Net's fast-path step (channels-last fp32,
AdamW); prediction: the deployed LM-Net, one 256 x 256 image (PyTorch engine). The table gives
each median in seconds and as a multiple of the quiet one (the issue's bound: 2.5x).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import machine, report  # noqa: E402

import lmnet  # noqa: E402
from lmnet.losses import SegmentationLoss  # noqa: E402
from lmnet.runtime import ThreadGovernor, keep_freed_memory  # noqa: E402


def spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/busy.json")
    args = p.parse_args()
    keep_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = lmnet.create_model("lmnet").to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = SegmentationLoss(torch.tensor([0.8, 1.2]), dice_weight=1.0)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch, args.size, args.size))
    deployed = lmnet.deploy(lmnet.create_model("lmnet")).to(memory_format=torch.channels_last)
    image = torch.randn(1, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)

    def train_step() -> None:
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def predict() -> None:
        with torch.inference_mode():
            deployed(image)

    def timed(fn, n: int, governor: ThreadGovernor | None = None) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
            if governor is not None:
                governor.update()
        return out

    work = {"training step": (train_step, 3), "predict, 1 image": (predict, 12)}
    for fn, _ in work.values():  # warm-up
        fn()
        fn()
    times: dict[tuple[str, str], list[float]] = {}
    governed_threads: list[int] = []
    for _ in range(args.rounds):
        for name, (fn, n) in work.items():
            torch.set_num_threads(2)
            times.setdefault((name, "quiet, 2 threads"), []).extend(timed(fn, n))
        spinner = mp.get_context("spawn").Process(target=spin, args=(3600,), daemon=True)
        spinner.start()
        time.sleep(1.0)
        try:
            for name, (fn, n) in work.items():
                torch.set_num_threads(2)
                times.setdefault((name, "one core busy, 2 threads"), []).extend(timed(fn, n))
                gov = ThreadGovernor(max_threads=2, interval=1.0, enabled=True)
                spin_until = time.perf_counter() + 1.1  # its first look needs an interval of history
                while time.perf_counter() < spin_until:
                    fn()
                gov.update()
                times.setdefault((name, "one core busy, lmnet's governor"), []).extend(
                    timed(fn, n, gov))
                governed_threads.append(gov.threads)
        finally:
            spinner.terminate()
            spinner.join()
        time.sleep(1.0)
    torch.set_num_threads(2)
    rows = []
    for (name, setting), ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        quiet = sorted(times[(name, "quiet, 2 threads")])[len(times[(name, "quiet, 2 threads")]) // 2]
        rows.append({"work": name, "setting": setting, "seconds_median": round(med, 4),
                     "x_quiet": round(med / quiet, 2), "runs": len(ts)})
    cols = [("work", "work"), ("setting", "setting"), ("s (median)", "seconds_median"),
            ("x quiet", "x_quiet")]
    report(rows, cols, args.out, machine(), size=args.size, batch=args.batch,
           governed_threads=governed_threads)


if __name__ == "__main__":
    main()
