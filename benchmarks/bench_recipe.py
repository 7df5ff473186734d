"""Training to a given accuracy: the configs' fixed-size recipe against progressive resizing, side
by side with the same seed, split and epochs, on real Kvasir-SEG (run by hand, not in CI).

    python benchmarks/bench_recipe.py [--data ../shared/datasets/kvasir-seg] [--epochs 6]
                                      [--low 128] [--low-epochs 5] [--size 256] [--seed 0]
                                      [--out benchmarks/results/recipe.json]
    python benchmarks/bench_recipe.py --report benchmarks/results/recipe.json   # table again

Each recipe runs as its own ``lmnet train`` process (the command users run: data loading, the
paper's augmentation and validation included) into a temporary folder; the table gives the
wall-clock of the whole run, seconds per epoch, and the validation scores after the last epoch
(always at ``--size``), and the speed-up of progressive resizing. Nothing else may run meanwhile.
"""
from __future__ import annotations

import argparse
import csv
import json
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


def seconds_to(row: dict, target: float) -> float | None:
    """Seconds of training (epochs, validation included) until the row's validation Dice first
    reaches ``target``; None if it never does."""
    spent = 0.0
    for secs, dice in zip(row["epoch_seconds"], row["val_fg_dice"]):
        spent += secs
        if dice >= target:
            return round(spent, 1)
    return None


def report(result: dict) -> dict:
    """Print the table; add to ``result`` the time-to-accuracy of both recipes for the fixed
    recipe's final Dice and for the progressive one's (what each costs to reach the other's)."""
    rows, epochs = result["rows"], result["epochs"]
    fixed, prog = rows
    for r in rows:
        r["seconds_to_fixed_final_dice"] = seconds_to(r, fixed["val_fg_dice_last"])
        r["seconds_to_progressive_final_dice"] = seconds_to(r, prog["val_fg_dice_last"])
    print(f"| recipe | wall-clock (s) | s per epoch | val Dice (fg) per epoch | val Dice (fg) after "
          f"epoch {epochs} | val mDice (paper) | s to the fixed recipe's final Dice "
          "| s to the progressive recipe's final Dice |\n|---|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['wall_seconds']} | {', '.join(f'{s:.0f}' for s in r['epoch_seconds'])} "
              f"| {', '.join(f'{d:.3f}' for d in r['val_fg_dice'])} "
              f"| {r['val_fg_dice_last']:.4f} | {r['val_paper_mdice_last']:.4f} "
              f"| {r['seconds_to_fixed_final_dice'] or 'not reached'} "
              f"| {r['seconds_to_progressive_final_dice'] or 'not reached'} |")
    result["speedup"] = round(fixed["wall_seconds"] / prog["wall_seconds"], 2)
    result["speedup_to_fixed_final_dice"] = result["speedup_to_progressive_final_dice"] = None
    for name, key in (("fixed", "seconds_to_fixed_final_dice"),
                      ("progressive", "seconds_to_progressive_final_dice")):
        target = rows[0 if name == "fixed" else 1]["val_fg_dice_last"]
        a, b = fixed[key], prog[key]
        if a and b:
            result[f"speedup_to_{name}_final_dice"] = round(a / b, 2)
            print(f"\nto the {name} recipe's final validation Dice ({target:.4f}): {a / b:.2f}x less "
                  "training wall-clock with progressive resizing")
        else:
            print(f"\nto the {name} recipe's final validation Dice ({target:.4f}): "
                  f"{'progressive' if not b else 'fixed'} does not reach it in {epochs} epochs")
    print(f"\nprogressive resizing: {result['speedup']:.2f}x less wall-clock for the same {epochs} "
          f"epochs ({result['low_epochs']} at {result['low']}, the rest at {result['size']}); "
          f"validation at {result['size']}.")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "kvasir-seg"))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--low", type=int, default=128)
    p.add_argument("--low-epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recipe.json"))
    p.add_argument("--report", metavar="JSON", default=None,
                   help="train nothing: print the table of an earlier run's JSON (and refresh its "
                        "time-to-accuracy fields in place)")
    args = p.parse_args()
    if args.report:
        path = Path(args.report)
        write_json(path, report(json.loads(path.read_text())))
        return
    with tempfile.TemporaryDirectory(prefix="lmnet-recipe-") as tmp:
        rows = [run("fixed", args, [], Path(tmp)),
                run("progressive", args, ["--progressive-size", str(args.low),
                                          "--progressive-epochs", str(args.low_epochs)], Path(tmp))]
    result = {"command": "python benchmarks/bench_recipe.py " + " ".join(sys.argv[1:]),
              "machine": machine(), "epochs": args.epochs, "size": args.size, "low": args.low,
              "low_epochs": args.low_epochs, "seed": args.seed, "rows": rows}
    write_json(args.out, report(result))


if __name__ == "__main__":
    main()
