"""Evaluation reports: ``metrics.json``, ``per_image.csv`` and a markdown table, plus the
mean ± std of several runs (seeds, folds)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

from lmnet._files import atomic_path, atomic_write_text
from lmnet.metrics.evaluator import mean_std

__all__ = ["PAPER_COLUMNS", "markdown_table", "write_report", "aggregate_runs", "runs_table"]

#: The paper's column order, then our additions: (header, key in a summary, scale to display).
PAPER_COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("Accuracy", "accuracy_pooled", 100.0),
    ("Precision", "precision_pooled", 100.0),
    ("Recall", "recall_pooled", 100.0),
    ("mDice (paper)", "paper_mdice", 100.0),
    ("mIoU (paper)", "paper_miou", 100.0),
    ("Hd", "hd_mean", 1.0),
    ("RAD %", "rad_pooled_percent", 1.0),
    ("Dice (fg)", "fg_dice_mean", 100.0),
    ("IoU (fg)", "fg_iou_mean", 100.0),
    ("HD95", "hd95_mean", 1.0),
)

PER_IMAGE_FIELDS = ("name", "group", "height", "width", "true_area", "pred_area", "tp", "fp", "fn",
                    "tn", "accuracy", "precision", "recall", "specificity", "dice", "iou", "hd",
                    "hd95", "assd", "boundary_case", "rad_percent")

_NOTE = ("Accuracy, Precision, Recall: lesion class, pooled over the set. mDice/mIoU (paper): mean "
         "over {{background, lesion}} of pooled Dice/IoU. Dice/IoU (fg): lesion, mean over images. "
         "Hd, HD95: mean over images, in {unit}. RAD: pooled, signed, percent. Ratios in percent.")


def _fmt(value: Any, scale: float) -> str:
    return "n/a" if value is None else f"{value * scale:.2f}"


def markdown_table(result: dict[str, Any]) -> str:
    """The paper's columns for the whole set and for each subgroup, as a markdown table."""
    header = "| set | n | " + " | ".join(h for h, _, _ in PAPER_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(PAPER_COLUMNS) + 2)]
    sets = [("all", result["all"])] + list(result.get("groups", {}).items())
    for name, summary in sets:
        cells = [_fmt(summary.get(k), s) for _, k, s in PAPER_COLUMNS]
        lines.append(f"| {name} | {summary['n_images']} | " + " | ".join(cells) + " |")
    unit = result.get("settings", {}).get("distance_unit", "pixel")
    lines += ["", _NOTE.format(unit=unit + "s" if unit == "pixel" else unit)]
    a = result["all"]
    lines.append(f"Empty masks: {a['n_both_empty']} images with both empty (distance 0), "
                 f"{a['n_pred_empty']} with only the prediction empty and {a['n_true_empty']} with "
                 "only the truth empty (distance: "
                 f"{result.get('settings', {}).get('empty_distance', 'diagonal')}).")
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], rows: Sequence[dict[str, Any]], out_dir: str | Path,
                 extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``metrics.json``, ``per_image.csv`` and ``metrics.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json", "csv": out / "per_image.csv", "md": out / "metrics.md"}
    payload = dict(result)
    if extra:
        payload.update(extra)
    with atomic_path(paths["csv"]) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=PER_IMAGE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in PER_IMAGE_FIELDS})
    atomic_write_text(paths["md"], markdown_table(result))
    # metrics.json last: its presence marks an evaluation as done
    atomic_write_text(paths["json"], json.dumps(payload, indent=2) + "\n")
    return paths


def aggregate_runs(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean ± std over runs of every number in the runs' ``"all"`` summaries.

    Args:
        results: the ``metrics.json`` contents of each run (or their ``"all"`` dicts).

    Returns:
        ``{key: {"mean", "std", "n"}}``; std is the sample standard deviation over runs.
    """
    if not results:
        raise ValueError("no runs to aggregate")
    summaries = [r.get("all", r) for r in results]
    keys = [k for k, v in summaries[0].items() if isinstance(v, (int, float)) or v is None]
    out = {}
    for k in keys:
        vals = [s.get(k) for s in summaries if isinstance(s.get(k), (int, float))]
        mean, std = mean_std(vals)
        out[k] = {"mean": mean, "std": std, "n": len(vals)}
    return out


def runs_table(agg: dict[str, dict[str, Any]]) -> str:
    """A one-row markdown table of ``mean ± std`` over runs in the paper's column order."""
    cells = []
    for _, key, scale in PAPER_COLUMNS:
        m, s = agg.get(key, {}).get("mean"), agg.get(key, {}).get("std")
        cells.append("n/a" if m is None else f"{m * scale:.2f}" + ("" if s is None else f" ± {s * scale:.2f}"))
    n = max((v["n"] for v in agg.values()), default=0)
    return ("| runs | " + " | ".join(h for h, _, _ in PAPER_COLUMNS) + " |\n|" +
            "---|" * (len(PAPER_COLUMNS) + 1) + f"\n| {n} | " + " | ".join(cells) + " |\n")
