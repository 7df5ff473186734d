"""Evaluation reports: ``metrics.json``, ``per_image.csv`` and a markdown table, plus the
mean ± std of several runs (seeds, folds)."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from lmnet._files import atomic_path, atomic_write_text
from lmnet.metrics.evaluator import mean_std

__all__ = ["Column", "COLUMNS", "PAPER_COLUMNS", "CONVENTION_COLUMNS", "VERDICT_COLUMNS",
           "columns", "mean_std_cell", "markdown_table", "write_report", "aggregate_runs",
           "runs_table", "write_markdown_table", "write_csv_table"]


@dataclass(frozen=True)
class Column:
    """One metric as every table shows it: evaluation reports, experiment tables and verdicts."""

    header: str
    key: str                                   # key in an evaluation summary
    scale: float = 100.0                       # displayed value = stored value x scale
    higher_is_better: bool | None = True       # None: signed, not ranked (RAD)


#: Every metric lmnet tabulates, in the paper's column order, then ours; the one definition.
COLUMNS: dict[str, Column] = {c.key: c for c in (
    Column("Accuracy", "accuracy_pooled"),
    Column("Precision", "precision_pooled"),
    Column("Recall", "recall_pooled"),
    Column("mDice", "paper_mdice"),
    Column("mIoU", "paper_miou"),
    Column("Hd", "hd_mean", 1.0, False),
    Column("RAD", "rad_pooled_percent", 1.0, None),
    Column("Dice (fg)", "fg_dice_mean"),
    Column("IoU (fg)", "fg_iou_mean"),
    Column("HD95", "hd95_mean", 1.0, False),
)}


def columns(*keys: str) -> tuple[Column, ...]:
    """The :data:`COLUMNS` of ``keys``, in that order."""
    return tuple(COLUMNS[k] for k in keys)


#: An evaluation report's table: every column.
PAPER_COLUMNS: tuple[Column, ...] = tuple(COLUMNS.values())
#: An experiment's tables, one per Dice convention: the paper's (mean over background and lesion)
#: and the polyp literature's (lesion only, mean over images).
CONVENTION_COLUMNS: dict[str, tuple[Column, ...]] = {
    "paper": columns("accuracy_pooled", "precision_pooled", "recall_pooled", "paper_mdice",
                     "paper_miou", "hd_mean", "rad_pooled_percent"),
    "foreground": columns("accuracy_pooled", "precision_pooled", "recall_pooled", "fg_dice_mean",
                          "fg_iou_mean", "hd95_mean", "rad_pooled_percent"),
}
#: What a verdict compares.
VERDICT_COLUMNS: tuple[Column, ...] = columns("paper_mdice", "paper_miou", "fg_dice_mean",
                                              "fg_iou_mean", "hd95_mean")

PER_IMAGE_FIELDS = ("name", "group", "height", "width", "true_area", "pred_area", "tp", "fp", "fn",
                    "tn", "accuracy", "precision", "recall", "specificity", "dice", "iou", "hd",
                    "hd95", "assd", "boundary_case", "rad_percent")

_NOTE = ("Accuracy, Precision, Recall: lesion class, pooled over the set. mDice/mIoU: the paper's, mean "
         "over {{background, lesion}} of pooled Dice/IoU. Dice/IoU (fg): lesion, mean over images. "
         "Hd, HD95: mean over images, in {unit}. RAD: pooled, signed, percent. Ratios in percent.")


def _fmt(value: Any, scale: float) -> str:
    return "n/a" if value is None else f"{value * scale:.2f}"


def mean_std_cell(values: Iterable[float | None], scale: float = 1.0) -> str:
    """``mean ± std`` of the values that are not None, scaled, two decimals; the mean alone for
    one value; ``n/a`` for none."""
    mean, std = mean_std(v for v in values if v is not None)
    if mean is None:
        return "n/a"
    return f"{mean * scale:.2f}" + ("" if std is None else f" ± {std * scale:.2f}")


def markdown_table(result: dict[str, Any]) -> str:
    """The paper's columns for the whole set and for each subgroup, as a markdown table."""
    header = "| set | n | " + " | ".join(c.header for c in PAPER_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(PAPER_COLUMNS) + 2)]
    sets = [("all", result["all"])] + list(result.get("groups", {}).items())
    for name, summary in sets:
        cells = [_fmt(summary.get(c.key), c.scale) for c in PAPER_COLUMNS]
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
    for c in PAPER_COLUMNS:
        m, s = agg.get(c.key, {}).get("mean"), agg.get(c.key, {}).get("std")
        cells.append("n/a" if m is None else f"{m * c.scale:.2f}"
                     + ("" if s is None else f" ± {s * c.scale:.2f}"))
    n = max((v["n"] for v in agg.values()), default=0)
    return ("| runs | " + " | ".join(c.header for c in PAPER_COLUMNS) + " |\n|" +
            "---|" * (len(PAPER_COLUMNS) + 1) + f"\n| {n} | " + " | ".join(cells) + " |\n")


def write_markdown_table(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[str]],
                         caption: str, footer: Sequence[str] = ()) -> Path:
    """A markdown table with its caption (and ``footer`` lines) below it, written atomically."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n\n" + caption + "\n" + "".join(f"\n{f}" for f in footer)
    atomic_write_text(Path(path), text + ("\n" if footer else ""))
    return Path(path)


def write_csv_table(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    """A CSV file of a header and rows, written atomically."""
    with atomic_path(Path(path)) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return Path(path)
