"""Training to a given accuracy: the configs' fixed-size recipe against progressive resizing, side
by side with the same seed, split and epochs, on real Kvasir-SEG (run by hand, not in CI).

    python benchmarks/bench_recipe.py [--data ../shared/datasets/kvasir-seg] [--epochs 6]
                                      [--low 128] [--low-epochs 5] [--size 256] [--seed 0]
                                      [--out benchmarks/results/recipe.json]

Each recipe runs as its own ``lmnet train`` process (the command users run: data loading, the
paper's augmentation and validation included) into a temporary folder; the table gives the
wall-clock of the whole run, seconds per epoch, and the validation scores after the last epoch
(always at ``--size``), and the speed-up of progressive resizing. Nothing else may run meanwhile.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json  # noqa: E402  (first: sets oneDNN's cache before torch loads)

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, args: argparse.Namespace, extra: list[str], tmp: Path) -> dict:
    cmd = [sys.executable, "-m", "lmnet", "train", "--config", str(ROOT / "configs" / "kvasir.yaml"),
           "--data", args.data, "--image-size", str(args.size), "--epochs", str(args.epochs),
           "--seed", str(args.seed), "--out", str(tmp), "--name", name, "--quiet", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    rows = list(csv.DictReader((tmp / name / "log.csv").open()))
    last = rows[-1]
    return {"recipe": name, "command": " ".join(cmd[1:]).replace(str(tmp), "TMP"),
            "wall_seconds": round(wall, 1),
            "epoch_seconds": [float(r["epoch_seconds"]) for r in rows],
            "val_fg_dice": [round(float(r["val_fg_dice"]), 4) for r in rows],
            "val_paper_mdice_last": round(float(last["val_paper_mdice"]), 4),
            "val_fg_dice_last": round(float(last["val_fg_dice"]), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "kvasir-seg"))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--low", type=int, default=128)
    p.add_argument("--low-epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recipe.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmnet-recipe-") as tmp:
        rows = [run("fixed", args, [], Path(tmp)),
                run("progressive", args, ["--progressive-size", str(args.low),
                                          "--progressive-epochs", str(args.low_epochs)], Path(tmp))]
    speedup = rows[0]["wall_seconds"] / rows[1]["wall_seconds"]
    # wall-clock until each recipe's validation Dice first reaches the fixed recipe's final one
    target = rows[0]["val_fg_dice_last"]
    for r in rows:
        spent, r["seconds_to_fixed_final_dice"] = 0.0, None
        for secs, dice in zip(r["epoch_seconds"], r["val_fg_dice"]):
            spent += secs
            if dice >= target:
                r["seconds_to_fixed_final_dice"] = round(spent, 1)
                break
    reach = [r["seconds_to_fixed_final_dice"] for r in rows]
    print(f"| recipe | wall-clock (s) | s per epoch | val Dice (fg) per epoch | val Dice (fg) after "
          f"epoch {args.epochs} | val mDice (paper) | s of training to the fixed recipe's final Dice |"
          "\n|---|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['wall_seconds']} | {', '.join(f'{s:.0f}' for s in r['epoch_seconds'])} "
              f"| {', '.join(f'{d:.3f}' for d in r['val_fg_dice'])} "
              f"| {r['val_fg_dice_last']:.4f} | {r['val_paper_mdice_last']:.4f} "
              f"| {r['seconds_to_fixed_final_dice'] or 'not reached'} |")
    if all(reach):
        print(f"\nto the fixed recipe's final validation Dice ({target:.4f}): "
              f"{reach[0] / reach[1]:.2f}x less training wall-clock with progressive resizing")
    print(f"\nprogressive resizing: {speedup:.2f}x less wall-clock for the same {args.epochs} epochs "
          f"({args.low_epochs} at {args.low}, the rest at {args.size}); validation at {args.size}.")
    write_json(args.out, {"command": "python benchmarks/bench_recipe.py " + " ".join(sys.argv[1:]),
                          "machine": machine(), "epochs": args.epochs, "size": args.size,
                          "low": args.low, "low_epochs": args.low_epochs, "seed": args.seed,
                          "rows": rows, "speedup": round(speedup, 2),
                          "speedup_to_fixed_final_dice": round(reach[0] / reach[1], 2) if all(reach) else None})


if __name__ == "__main__":
    main()
