"""Figures of an experiment (matplotlib, PNG): validation curves with seed bands, and a
qualitative grid of test images with every model's prediction outlined (as the paper's Fig. 5);
:func:`write_figures` draws both from an experiment's finished runs."""
from __future__ import annotations

import csv
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmnet._files import atomic_save
from lmnet.engine.experiment_matrix import ExperimentConfig, plan_runs
from lmnet.engine.experiment_state import run_status
from lmnet.run_folder import RunFolder

__all__ = ["plot_curves", "plot_qualitative", "seed_band", "write_figures", "figure_samples"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def seed_band(curves: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, lowest and highest value per epoch over runs' curves. Runs of one model may have
    logged different numbers of epochs (one cut by its budget, one still training): each epoch
    is taken over the runs that reached it, so no run's later epochs are dropped."""
    n = max(len(c) for c in curves)
    arr = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        arr[i, :len(c)] = c
    return np.nanmean(arr, 0), np.nanmin(arr, 0), np.nanmax(arr, 0)


def plot_curves(runs_by_label: dict[str, Sequence[Path]], out: Path, metric: str = "val_paper_mdice",
                title: str = "") -> Path | None:
    """One line per model: the mean over its runs of ``metric`` per epoch, with a band from the
    lowest to the highest run; ``runs_by_label`` maps a label to its run folders. None if no run
    has logged an epoch yet."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    drawn = False
    for label, run_dirs in runs_by_label.items():
        curves = []
        for run in run_dirs:
            log = RunFolder(run).log
            if log.is_file():
                values = [float(r[metric]) for r in csv.DictReader(log.open())]
                if values:
                    curves.append(values)
        if not curves:
            continue
        mean, low, high = seed_band(curves)
        epochs = np.arange(1, len(mean) + 1)
        line, = ax.plot(epochs, mean * 100, label=f"{label} ({len(curves)} runs)", lw=1.6)
        if len(curves) > 1:
            ax.fill_between(epochs, low * 100, high * 100, color=line.get_color(), alpha=0.18, lw=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel({"val_paper_mdice": "validation mDice (paper convention), %",
                   "val_fg_dice": "validation Dice (foreground), %"}.get(metric, metric))
    ax.set_title(textwrap.fill(title or "Validation per epoch: mean over seeds, band = lowest to "
                               "highest run", 90), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(out, fig.savefig)
    plt.close(fig)
    return out


def plot_qualitative(images: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                     predictions: dict[str, Sequence[np.ndarray]], names: Sequence[str],
                     out: Path) -> Path:
    """Rows: test images; columns: the image, the ground truth, then each model's prediction
    outlined in yellow over the image, with the truth outlined in green for reference.

    ``images`` are ``uint8 (H, W, C)``; ``truths`` and every prediction ``bool (H, W)`` of the
    same size.
    """
    from scipy import ndimage

    plt = _pyplot()

    def edge(mask: np.ndarray) -> np.ndarray:
        return mask & ~ndimage.binary_erosion(mask, iterations=max(1, mask.shape[0] // 128))

    cols = 2 + len(predictions)
    fig, axes = plt.subplots(len(images), cols, figsize=(2.0 * cols, 2.0 * len(images)), dpi=120,
                             squeeze=False)
    for i, (img, truth) in enumerate(zip(images, truths)):
        rgb = img[..., :3] if img.shape[2] >= 3 else np.repeat(img[..., :1], 3, 2)
        panels = [("image", rgb), ("ground truth", np.repeat((truth * 255).astype(np.uint8)[..., None],
                                                               3, 2))]
        for label, preds in predictions.items():
            shown = rgb.copy()
            shown[edge(truth)] = (0, 220, 0)
            shown[edge(preds[i])] = (255, 230, 0)
            panels.append((label, shown))
        for j, (title, panel) in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
        axes[i][0].set_ylabel(textwrap.fill(names[i], 18, break_long_words=False), fontsize=6)
    fig.suptitle("yellow: prediction, green: ground truth", fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(out, fig.savefig)
    plt.close(fig)
    return out


def write_figures(cfg: ExperimentConfig, data: str | None = None, n_images: int = 4
                  ) -> dict[str, Path]:
    """``curves.png`` (validation mDice per epoch, every model, seed band) and
    ``qualitative.png`` (``n_images`` test images, see :func:`figure_samples`; each model's first
    finished run), from whatever has finished. A run's predictions for the figure are kept in its folder
    (``figure_masks_<split>.npz``): with its logs and evaluation, a finished run's small files
    rebuild both tables and figures without its checkpoints. Returns the files written."""
    from lmnet.data.dataset import load_sample
    from lmnet.data.layouts import discover
    from lmnet.deploy.loading import load_model
    from lmnet.deploy.postprocess import predict_probabilities, probabilities_to_mask
    from lmnet.deploy.preprocess import preprocess

    runs = plan_runs(cfg, data)
    out = Path(cfg.out) / cfg.name
    by_label: dict[str, list[Path]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run.run_dir)
    written = {}
    curves = plot_curves(by_label, out / "curves.png",
                         title=f"{cfg.caption} Validation mDice per epoch: mean over seeds, band = "
                               "lowest to highest run".strip())
    if curves:
        written["curves"] = curves
    finished = {}
    for run in runs:
        if run.label not in finished and run_status(run, cfg) == "done":
            finished[run.label] = run
    if not finished:
        return written
    first = next(iter(finished.values()))
    split = RunFolder(first.run_dir).read_split()
    _, samples, _ = discover(first.config.data, first.config.format)
    by_name = {s.name: s for s in samples}
    chosen = figure_samples([by_name[n] for n in sorted(split[cfg.split])], n_images)
    loaded = [load_sample(s, first.config.in_channels) for s in chosen]
    names = [s.name for s in chosen]
    preds = {}
    for label, run in finished.items():
        kept = RunFolder(run.run_dir).figure_masks(cfg.split)  # the figure without the checkpoint
        best = RunFolder(run.run_dir).best
        stale = best.is_file() and kept.is_file() and best.stat().st_mtime > kept.stat().st_mtime
        masks = None if stale else _kept_masks(kept, names)
        if masks is None:
            model, tcfg = load_model(run.run_dir)
            x = preprocess([img for img, _ in loaded], tcfg.image_size, tcfg.mean, tcfg.std)
            masks = [probabilities_to_mask(predict_probabilities(model, x[i:i + 1],
                                                                 img.shape[:2]))[0]
                     for i, (img, _) in enumerate(loaded)]
            _keep_masks(kept, names, masks)
        preds[label] = masks
    written["qualitative"] = plot_qualitative([img for img, _ in loaded],
                                              [m.astype(bool) for _, m in loaded], preds,
                                              names, out / "qualitative.png")
    return written


def figure_samples(samples: list[Any], n: int) -> list[Any]:
    """The qualitative figure's images: the first ``n`` by name, or, where the samples have
    subgroups (BUSI's classes), the first of every subgroup in turn, so that each class shows."""
    by_group: dict[str, list[Any]] = {}
    for s in samples:
        by_group.setdefault(s.group or "", []).append(s)
    if len(by_group) < 2:
        return samples[:n]
    chosen: list[Any] = []
    for depth in range(max(len(v) for v in by_group.values())):
        for group in sorted(by_group):
            if depth < len(by_group[group]) and len(chosen) < n:
                chosen.append(by_group[group][depth])
    return chosen


def _kept_masks(path: Path, names: list[str]) -> list[Any] | None:
    """The predicted masks of ``names`` kept in ``path`` by :func:`_keep_masks`, else None."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as kept:
            if [str(n) for n in kept["names"]] != names:
                return None
            return [kept[f"mask{i}"] for i in range(len(names))]
    except (OSError, KeyError, ValueError):
        return None


def _keep_masks(path: Path, names: list[str], masks: list[Any]) -> None:
    """Keep a run's predicted masks of the figure's images beside its logs (a few kB), so that the
    figure can be drawn again from a run's small files alone (logs, evaluation, these masks)."""
    import numpy as np

    atomic_save(path, lambda tmp: np.savez_compressed(
        tmp, names=np.array(names), **{f"mask{i}": np.asarray(m, dtype=bool)
                                       for i, m in enumerate(masks)}))
