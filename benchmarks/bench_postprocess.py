"""What test-time augmentation and mask clean-up do to a model's test scores, and what they cost
(run by hand, not in CI).

    python benchmarks/bench_postprocess.py [--weights kvasir | --run RUN] [--data DATA]
        [--split test] [--grid resized] [--min-pixels 100 500] [--engine torch]
        [--out benchmarks/results/postprocess.json]

Every row is ``lmnet evaluate`` (:func:`lmnet.engine.evaluate.evaluate_run`) with one setting of
``--tta``, ``--keep-largest`` and ``--min-lesion-pixels`` on the same images; its wall-clock
(loading, inference, scoring) is the cost. Foreground Dice is the mean over images, HD95 in pixels.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, report, scratch_dir  # noqa: E402

from lmnet.deploy.postprocess import PostProcess  # noqa: E402
from lmnet.engine.evaluate import evaluate_run  # noqa: E402


def settings(min_pixels: list[int]) -> list[tuple[str, PostProcess]]:
    rows = [("none", PostProcess()), ("--tta hflip", PostProcess(tta="hflip")),
            ("--tta flips", PostProcess(tta="flips")), ("--keep-largest", PostProcess(largest=True))]
    rows += [(f"--min-lesion-pixels {n}", PostProcess(min_pixels=n)) for n in min_pixels]
    rows.append(("--tta flips --keep-largest", PostProcess(tta="flips", largest=True)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="kvasir")
    ap.add_argument("--run", default=None, help="a run folder instead of --weights")
    ap.add_argument("--data", default=None)
    ap.add_argument("--split", default="test")
    ap.add_argument("--grid", default="resized")
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--min-pixels", type=int, nargs="*", default=[100, 500])
    ap.add_argument("--out", default="benchmarks/results/postprocess.json")
    args = ap.parse_args()
    weights = None if args.run else args.weights
    rows = []
    base = None
    for label, post in settings(args.min_pixels):
        t0 = time.perf_counter()
        result, _ = evaluate_run(args.run, args.data, args.split, grid=args.grid,
                                 out=Path(scratch_dir()) / "ev", progress=False, weights=weights,
                                 engine=args.engine, post=post)
        seconds = time.perf_counter() - t0
        a = result["all"]
        row = {"setting": label, "fg_dice_mean": round(100 * a["fg_dice_mean"], 2),
               "fg_dice_pooled": round(100 * a["fg_dice_pooled"], 2),
               "paper_mdice": round(100 * a["paper_mdice"], 2),
               "hd95_mean": round(a["hd95_mean"], 2) if a["hd95_mean"] is not None else None,
               "n_images": a["n_images"], "seconds": round(seconds, 1)}
        base = base or row
        row["dice_change"] = round(row["fg_dice_mean"] - base["fg_dice_mean"], 2)
        row["time_x"] = round(seconds / base["seconds"], 2)
        rows.append(row)
        print(row, flush=True)
    columns = [("setting", "setting"), ("n", "n_images"), ("Dice fg %", "fg_dice_mean"),
               ("change", "dice_change"), ("Dice pooled %", "fg_dice_pooled"),
               ("mDice paper %", "paper_mdice"), ("HD95 px", "hd95_mean"), ("s", "seconds"),
               ("time x", "time_x")]
    report(rows, columns, args.out, machine(), source=args.run or f"weights {args.weights}",
           split=args.split, grid=args.grid, engine=args.engine)


if __name__ == "__main__":
    main()
