"""An experiment's tables (mean ± std over seeds or folds, in both Dice conventions, and per
subgroup), its ledger of runs, and the verdict: where the reference row wins, ties or loses.
The columns are :mod:`lmnet.metrics.report`'s.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from lmnet.config import TrainConfig
from lmnet.engine.experiment_matrix import (
    ExperimentConfig,
    Run,
    model_entries,
    plan_runs,
    reference_label,
)
from lmnet.engine.experiment_state import eval_dir, log_rows, run_status, used_seconds
from lmnet.metrics.evaluator import mean_std
from lmnet.metrics.report import (
    CONVENTION_COLUMNS,
    VERDICT_COLUMNS,
    mean_std_cell,
    write_csv_table,
    write_markdown_table,
)
from lmnet.run_folder import RunFolder

__all__ = ["write_tables", "verdict"]

_NOTES = {
    "paper": "mDice / mIoU: mean over background and lesion of Dice / IoU pooled over the test set "
             "(the paper's convention). Accuracy, Precision, Recall: lesion, pooled. Hd: Hausdorff "
             "distance, mean over images, pixels at the evaluation size. RAD: relative area "
             "difference, pooled, signed, percent.",
    "foreground": "Dice / IoU (fg): lesion only, mean over images (the polyp literature's "
                  "convention). HD95: 95th-percentile Hausdorff distance, mean over images, "
                  "pixels at the evaluation size. Other columns as in the paper-convention table.",
}


def _model_size(run: Run) -> tuple[float, float]:
    """Deployed parameters (M) and MACs (G) at the run's image size."""
    c = run.config
    return _counted_size(c.model, json.dumps(c.model_args, sort_keys=True, default=str),
                         c.in_channels, c.n_classes, c.deployed_form, c.image_size)


@functools.lru_cache(maxsize=64)
def _counted_size(model: str, model_args: str, in_channels: int, n_classes: int,
                  deployed_form: bool, image_size: int) -> tuple[float, float]:
    """:func:`_model_size` of one network and size, counted once a process (the tables are
    written again after every run of a matrix; counting LM-Net's MACs takes seconds)."""
    from lmnet.deploy.checkpoint import build_model
    from lmnet.models._size import size_report

    config = TrainConfig(model=model, model_args=json.loads(model_args), in_channels=in_channels,
                         n_classes=n_classes, deployed_form=deployed_form, image_size=image_size)
    rep = size_report(build_model(config), model, image_size, in_channels)
    return rep.params_deployed / 1e6, rep.macs_deployed / 1e9


def _epochs_cell(trained: list[int], planned: int) -> str:
    """``8 of 8`` when every run of a row trained as many epochs, else ``4, 5 of 8``."""
    if not trained:
        return "n/a"
    per_run = str(trained[0]) if len(set(trained)) == 1 else ", ".join(map(str, trained))
    return f"{per_run} of {planned}"


def write_tables(cfg: ExperimentConfig, data: str | None = None) -> dict[str, Path]:
    """Markdown and CSV tables (mean ± std over seeds / folds, both conventions, subgroups) from
    the evaluated runs; rows for models with no finished run say so. Returns the files written."""
    runs = plan_runs(cfg, data)
    out = Path(cfg.out) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    spent: dict[str, list[tuple[int, float]]] = {}  # label -> (epochs trained, minutes) per done run
    ledger = []
    for run in runs:
        path = eval_dir(run, cfg) / "metrics.json"
        results.setdefault(run.label, [])
        spent.setdefault(run.label, [])
        status = run_status(run, cfg)
        epochs, minutes = len(log_rows(run)), used_seconds(run) / 60
        if path.is_file() and status == "done":
            results[run.label].append(json.loads(path.read_text()))
            spent[run.label].append((epochs, minutes))
        env = RunFolder(run.run_dir).read_env()
        commits = list(dict.fromkeys(str(s.get("git_commit") or "")[:7] or "unknown"
                                     for s in RunFolder(run.run_dir).read_sessions()))
        ledger.append([run.label, str(run.seed), "" if run.fold is None else str(run.fold), status,
                       f"{epochs}/{run.config.epochs}", f"{minutes:.1f}",
                       "yes" if status in ("done", "trained") and epochs < run.config.epochs else "",
                       str(env.get("threads", "")), str(env.get("cpu", "")), " ".join(commits),
                       str(run.run_dir)])
    sizes = {}
    for run in runs:
        if run.label not in sizes:
            sizes[run.label] = _model_size(run)
    entries = model_entries(cfg)
    shared = {e.label for e in entries if not e.recipe}  # the caption states their recipe
    first = next((run.config for run in runs if run.label in shared), runs[0].config)
    planned = {run.label: run.config.epochs for run in runs}
    caption = (f"{cfg.caption + ' ' if cfg.caption else ''}Test split of {Path(first.data).name}, "
               f"{first.image_size} x {first.image_size}, {first.epochs} epochs"
               + (f" (first {first.progressive_epochs} at {first.progressive_size})"
                  if first.progressive_epochs else "")
               + (f", at most {cfg.budget_minutes:g} min per run" if cfg.budget_minutes else "")
               + f", batch {first.batch_size}, lr {first.lr}; mean ± std over "
               + (f"{cfg.folds} folds x " if cfg.folds else "") + f"seeds {cfg.seeds}. "
               f"MACs at {first.image_size} x {first.image_size}, deployed model.")
    own = [f"{e.label}: " + ", ".join(f"{k} {v}" for k, v in e.recipe.items())
           for e in entries if e.recipe]
    if own:
        caption += " Rows with their own recipe keys: " + "; ".join(own) + "."
    caption += (" Epochs: trained of planned, per run where the runs differ (`4, 5 of 8`), fewer "
                "than planned where the wall-clock budget ended the "
                "run (its schedule unfinished); Min/run: wall-clock minutes of training and "
                "validation per run (`runs.csv` lists every run, its threads, CPU and commits).")
    written = {"runs_csv": write_csv_table(out / "runs.csv", ["Model", "Seed", "Fold", "Status", "Epochs",
                                                         "Minutes", "Cut by budget", "Threads",
                                                         "CPU", "Commits", "Run folder"],
                                                        ledger)}
    groups = sorted({g for rs in results.values() for r in rs for g in r.get("groups", {})})
    for conv, columns in CONVENTION_COLUMNS.items():
        header = ["Model", "Runs", "Epochs", "Min/run", *(c.header for c in columns), "MACs (G)",
                  "Params (M)"]
        rows = []
        for label, rs in results.items():
            cells = [mean_std_cell([r["all"].get(c.key) for r in rs], c.scale) for c in columns]
            params, macs = sizes[label]
            epochs = _epochs_cell([e for e, _ in spent[label]], planned[label])
            minutes = (f"{sum(m for _, m in spent[label]) / len(spent[label]):.0f}"
                       if spent[label] else "n/a")
            rows.append([label, str(len(rs)), epochs, minutes, *cells, f"{macs:.2f}", f"{params:.2f}"])
        written[f"{conv}_md"] = write_markdown_table(out / f"table_{conv}.md", header, rows,
                                                     caption + " " + _NOTES[conv])
        written[f"{conv}_csv"] = write_csv_table(out / f"table_{conv}.csv", header, rows)
        if groups:
            gheader = ["Subgroup", "Model", "Runs", *(c.header for c in columns)]
            grows = []
            for g in groups:
                for label, rs in results.items():
                    have = [r["groups"][g] for r in rs if g in r.get("groups", {})]
                    grows.append([g, label, str(len(have)),
                                  *(mean_std_cell([h.get(c.key) for h in have], c.scale)
                                    for c in columns)])
            written[f"{conv}_groups_md"] = write_markdown_table(
                out / f"table_{conv}_subgroups.md", gheader, grows,
                caption + " Per subgroup. " + _NOTES[conv])
            written[f"{conv}_groups_csv"] = write_csv_table(out / f"table_{conv}_subgroups.csv", gheader,
                                                       grows)
    written.update(_write_verdict(cfg, out, results, sizes, caption))
    return written


def verdict(ref: list[float], other: list[float], higher_is_better: bool = True) -> str:
    """``wins``, ``ties`` or ``loses`` (with the difference of the means, reference minus other)
    when both rows have two or more runs: a tie is a difference within the sum of the two rows'
    sample standard deviations over seeds. With a single run on either side there is no spread to
    judge by: ``ahead (1 run)`` / ``behind (1 run)``. ``n/a`` without runs."""
    (m_ref, s_ref), (m_other, s_other) = mean_std(ref), mean_std(other)
    if m_ref is None or m_other is None:
        return "n/a"
    diff = m_ref - m_other
    better = diff if higher_is_better else -diff
    if s_ref is None or s_other is None:
        word = "ahead (1 run)" if better > 0 else "behind (1 run)" if better < 0 else "equal (1 run)"
    else:
        word = "ties" if abs(diff) <= s_ref + s_other else "wins" if better > 0 else "loses"
    return f"{word} {diff:+.2f}"


def _judge(ref_parts: list[dict[str, Any]], parts: list[dict[str, Any]],
           counts: dict[str, dict[str, int]]) -> list[str]:
    """One verdict cell per :data:`~lmnet.metrics.report.VERDICT_COLUMNS` metric (the reference's
    summaries against another row's), tallied into ``counts`` (metric -> wins / ties / loses)."""
    cells = []
    for c in VERDICT_COLUMNS:
        cell = verdict([r[c.key] * c.scale for r in ref_parts if r.get(c.key) is not None],
                       [r[c.key] * c.scale for r in parts if r.get(c.key) is not None],
                       bool(c.higher_is_better))
        cells.append(cell)
        word = cell.split(" ")[0]
        if word in counts.setdefault(c.header, {"wins": 0, "ties": 0, "loses": 0}):
            counts[c.header][word] += 1
    return cells


def _write_verdict(cfg: ExperimentConfig, out: Path, results: dict[str, list[dict[str, Any]]],
                   sizes: dict[str, tuple[float, float]], caption: str) -> dict[str, Path]:
    """``verdict.md`` / ``.csv``: where the reference row (LM-Net) wins, ties or loses against
    every other row, metric by metric, from the same evaluated runs as the tables; with
    subgroups (BUSI's classes), ``verdict_subgroups.md`` / ``.csv`` the same per subgroup."""
    ref = reference_label(cfg)
    if ref is None or len(results) < 2:
        return {}
    metrics = [c.header for c in VERDICT_COLUMNS]
    header = ["Against", "Runs", *metrics, "MACs", "Params"]
    rows: list[list[str]] = []
    counts: dict[str, dict[str, int]] = {}
    for label, rs in results.items():
        if label == ref:
            continue
        cells = _judge([r["all"] for r in results[ref]], [r["all"] for r in rs], counts)
        (p_ref, m_ref), (p_other, m_other) = sizes[ref], sizes[label]
        rows.append([label, f"{len(results[ref])} / {len(rs)}", *cells,
                     f"{m_ref / m_other:.2f}x", f"{p_ref / p_other:.2f}x"])
    summary = [f"- {h}: {ref} wins against {c['wins']}, ties with {c['ties']}, loses against "
               f"{c['loses']} of the {len(rows)} other rows"
               + (f"; {len(rows) - sum(c.values())} not judged (fewer than two runs on a side)"
                  if sum(c.values()) < len(rows) else "") for h, c in counts.items()]
    note = (f"Where {ref} wins, ties or loses against every other row: difference of the means "
            f"({ref} minus the other row; HD95: lower is better). A tie is a difference within the "
            "sum of both rows' sample standard deviations over seeds; with one run on either side "
            "there is no spread to judge by (`ahead` / `behind (1 run)`). MACs, Params: "
            f"{ref}'s over the other row's. Runs: {ref}'s / the other row's. mDice, mIoU: the "
            "paper's convention; Dice, IoU (fg): lesion only, mean over images.")
    md = write_markdown_table(out / "verdict.md", header, rows, caption + " " + note, summary)
    written = {"verdict_md": md, "verdict_csv": write_csv_table(out / "verdict.csv", header, rows)}
    groups = sorted({g for rs in results.values() for r in rs for g in r.get("groups", {})})
    if not groups:
        return written
    gheader = ["Subgroup", "Against", "Runs", *metrics]
    grows, gsummary = [], []
    for g in groups:
        ref_parts = [r["groups"][g] for r in results[ref] if g in r.get("groups", {})]
        gcounts: dict[str, dict[str, int]] = {}
        for label, rs in results.items():
            if label == ref:
                continue
            parts = [r["groups"][g] for r in rs if g in r.get("groups", {})]
            grows.append([g, label, f"{len(ref_parts)} / {len(parts)}",
                          *_judge(ref_parts, parts, gcounts)])
        tally = {w: sum(c[w] for c in gcounts.values()) for w in ("wins", "ties", "loses")}
        n = len(metrics) * (len(results) - 1)
        gsummary.append(f"- {g}: of {n} judgements (other rows x metrics) {ref} wins {tally['wins']}, "
                        f"ties {tally['ties']}, loses {tally['loses']}"
                        + (f", {n - sum(tally.values())} not judged" if sum(tally.values()) < n
                           else ""))
    gmd = write_markdown_table(out / "verdict_subgroups.md", gheader, grows,
                               caption + " Per subgroup (the images of one class of the test "
                               "split). " + note, gsummary)
    written.update(verdict_subgroups_md=gmd,
                   verdict_subgroups_csv=write_csv_table(out / "verdict_subgroups.csv", gheader, grows))
    return written
