"""Figures of an experiment (matplotlib, PNG): validation curves with seed bands, and a
qualitative grid of test images with every model's prediction outlined (as the paper's Fig. 5)."""
from __future__ import annotations

import csv
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from lmnet._files import atomic_save
from lmnet.run_folder import RunFolder

__all__ = ["plot_curves", "plot_qualitative", "seed_band"]


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
