"""``lmnet demo``: train LM-Net for a few minutes on the bundled Kvasir-SEG sample, evaluate it and
write a report folder with the metrics table and overlays."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from lmnet._files import atomic_write_text
from lmnet.config import TrainConfig
from lmnet.data.layouts import discover
from lmnet.data.sample import sample_data_path
from lmnet.data.splits import save_split
from lmnet.engine.evaluate import evaluate_run
from lmnet.engine.predict import predict_files
from lmnet.engine.train import read_log, step_seconds, train
from lmnet.metrics import markdown_table
from lmnet.run_folder import RunFolder

__all__ = ["sample_data_path", "run_demo", "training_sentence"]

log = logging.getLogger(__name__)


def plan_epochs(cfg: TrainConfig, train_images: int, minutes: float, most: int) -> int:
    """How many epochs (at most ``most``, at least 3 unless ``most`` is smaller) fit in ``minutes`` on this machine, now.

    Times a training step of the demo's model and batch (:func:`~lmnet.engine.train.step_seconds`)
    and allows a fifth more for data loading and validation. Measured, so a slow or busy machine trains
    fewer epochs but still completes the learning-rate schedule.
    """
    steps = -(-train_images // cfg.batch_size)
    epoch_s = 1.2 * steps * step_seconds(cfg)
    return max(min(3, most), min(most, int(minutes * 60 / epoch_s)))


def training_sentence(trained: int, planned: int, final: int,
                      replans: list[tuple[int, int, int]], last_lr: float,
                      cap_minutes: float | None) -> str:
    """What the demo's training did, as the report says it: epochs trained of those planned,
    re-plans, and whether the learning-rate schedule completed."""
    text = f"LM-Net trained for {trained} of {final} planned epochs"
    if replans:
        after = ", ".join(str(done) for done, _, _ in replans)
        lengths = " -> ".join([str(replans[0][1]), *(str(b) for _, _, b in replans)])
        text += (f" (re-planned after epoch{'s' if len(replans) > 1 else ''} {after}, which ran "
                 f"slower than measured: {lengths} epochs)")
    elif final != planned:
        text += f" (planned {planned} at first)"
    if trained >= final:
        return text + ": the cosine schedule completed."
    cap = f" by the demo's time cap of {cap_minutes:g} minutes" if cap_minutes else ""
    return (text + f": training was stopped{cap}, so the cosine schedule did **not** complete "
            f"(learning rate still {last_lr:.2g} after the last epoch); the numbers below are those "
            "of a model cut short.")


def _summary_figure(report: Path, run_dir: Path, images: list[Path], samples: list,
                    with_shipped: bool, most: int = 4) -> Path | None:
    """``summary.png``: image | truth | this demo's model | the shipped model (when there is one),
    each prediction outlined over the image with the truth outlined too."""
    from lmnet.data.dataset import load_sample
    from lmnet.data.io import read_mask
    from lmnet.engine.figures import plot_qualitative

    by_image = {s.image: s for s in samples}
    shown, truths, pictures = [], [], []
    predictions: dict[str, list[np.ndarray]] = {"this demo's model": []}
    if with_shipped:
        predictions["shipped model (--weights kvasir)"] = []
    folders = {"this demo's model": report / "predictions" / "masks",
               "shipped model (--weights kvasir)": report / "predictions_shipped_model" / "masks"}
    for path in images[:most]:
        masks = {k: folders[k] / f"{Path(path).stem}.png" for k in predictions}
        if not all(m.is_file() for m in masks.values()):
            continue
        image, truth = load_sample(by_image[path])
        pictures.append(image)
        truths.append(truth.astype(bool))
        for k, m in masks.items():
            predictions[k].append(read_mask(m))
        shown.append(Path(path).stem)
    if not shown:
        return None
    return plot_qualitative(pictures, truths, predictions, shown, report / "summary.png")


def _shipped_split(samples: list) -> dict[str, list[str]] | None:
    """A split of the sample whose held-out images the shipped Kvasir-SEG model never trained on
    (its own validation and test images), or None when no shipped model (or too few such images)."""
    from lmnet.deploy.pretrained import from_pretrained

    try:
        stored = from_pretrained("kvasir").pretrained_config.get("split") or {}
    except ValueError:
        return None
    unseen = {n for k in ("val", "test") for n in stored.get(k, [])}
    held = sorted(s.name for s in samples if s.name in unseen)
    rest = sorted(s.name for s in samples if s.name not in unseen)
    if len(held) < 3 or len(rest) < 8:
        return None
    rng = np.random.default_rng(0)
    rest = [rest[i] for i in rng.permutation(len(rest))]
    n_val = max(2, round(0.15 * len(samples)))
    return {"train": sorted(rest[n_val:]), "val": sorted(rest[:n_val]), "test": held}


def run_demo(out: str | Path = "lmnet_demo", minutes: float = 3.5, image_size: int = 128,
             epochs: int = 25, progress: bool = True) -> Path:
    """Train, evaluate and predict on the sample; returns the report folder ``out/report``.

    Training runs ``epochs`` epochs (the cosine schedule ends with them; about 2.5 minutes on two
    cores), or as many fewer as :func:`plan_epochs` measures to fit in ``minutes`` on a slower or
    busier machine (``minutes`` x 1.5 stops it in any case); the split is 70 / 15 / 15 % of the
    40 images.
    """
    t0 = time.perf_counter()
    out = Path(out)
    data = sample_data_path()
    run_dir = out / "run"
    if run_dir.exists():
        saved = RunFolder(run_dir).config
        if not saved.is_file() or json.loads(saved.read_text()).get("data") != str(data):
            raise ValueError(f"{run_dir} exists and is not an earlier demo run; choose another --out")
        shutil.rmtree(run_dir)
    _, samples, _ = discover(data, "kvasir")
    split = _shipped_split(samples)
    split_file = None
    if split is not None:  # held-out images that neither model trained on
        out.mkdir(parents=True, exist_ok=True)
        split_file = out / "split.json"  # the demo's own split, beside its run folder
        save_split(split, split_file)
    cfg = TrainConfig(data=str(data), format="kvasir", image_size=image_size, batch_size=8,
                      epochs=epochs, time_budget=1.5 * minutes, split_ratios=[0.7, 0.15, 0.15],
                      split_file=str(split_file) if split_file else None, out=str(out),
                      name="run", seed=0)
    n_train = len(split["train"]) if split else round(0.7 * len(samples))
    planned = plan_epochs(cfg, n_train, minutes, epochs)
    if planned < epochs and progress:
        log.info("this machine is slower than the demo assumes: training %d epochs instead of %d, "
                 "so that the learning-rate schedule completes within %g minutes", planned, epochs,
                 minutes)
    cfg = cfg.replace(epochs=planned)
    replans: list[tuple[int, int, int]] = []  # (after epoch, from, to)

    def replan(done: int, seconds: float) -> int | None:
        """Fewer epochs when the first ones ran slower than measured (a busier machine now)."""
        current = replans[-1][2] if replans else planned
        fit = done + int(max(0.0, minutes * 60 - seconds) / (seconds / done))
        if fit >= current:
            return None
        new = max(done + 1, fit)  # at least one more epoch, so the schedule ends at its minimum
        if new >= current:
            return None
        replans.append((done, current, new))
        if progress:
            log.info("%d epoch(s) took %.1f min, slower than measured: training %d epochs instead "
                     "of %d, so that the schedule completes in time", done, seconds / 60, new,
                     current)
        return new

    train(cfg, progress=progress, replan=replan, resume_hint=False)
    report = out / "report"
    result, _ = evaluate_run(run_dir, split="test", out=report, progress=False)
    test = set(RunFolder(run_dir).read_split()["test"])
    images = [s.image for s in samples if s.name in test]
    predict_files(run_dir, images, report / "predictions", progress=False, backend="torch",
                  overwrite=True)
    table = markdown_table(result)
    shipped_part = ("\nNo trained Kvasir-SEG model ships with this installation yet; once it does, "
                    "this report shows its predictions on the same images beside the demo's.\n")
    if split is not None:
        compare = report / "compare_original_size"
        own, _ = evaluate_run(run_dir, split="test", grid="original", out=compare / "demo_model",
                              progress=False)
        ship, _ = evaluate_run(None, data=data, split="test", split_file=RunFolder(run_dir).split,
                               grid="original", out=compare / "shipped_model", progress=False,
                               weights="kvasir", overlap_warning=False)  # the report says it
        predict_files(None, images, report / "predictions_shipped_model", progress=False,
                      weights="kvasir", backend="torch", overwrite=True)
        rows = [(f"this demo's LM-Net ({len(read_log(run_dir))} epochs on {len(split['train'])} images)",
                 own["all"]),
                ("shipped LM-Net (`--weights kvasir`)", ship["all"])]
        shipped_part = (
            "\n## Beside it: the trained LM-Net that ships with lmnet\n\n"
            f"The same {len(images)} held-out images, which neither model trained on (the shipped "
            "model never saw them in training: they are in its validation or test split), scored "
            "at each image's own size:\n\n| model | Dice (fg) | IoU (fg) | mDice (paper) |\n"
            "|---|---:|---:|---:|\n" + "".join(
                f"| {name} | {100 * r['fg_dice_mean']:.2f} | {100 * r['fg_iou_mean']:.2f} | "
                f"{100 * r['paper_mdice']:.2f} |\n" for name, r in rows) +
            "\nIts masks and overlays: `predictions_shipped_model/`; its model card: "
            "`python -c \"import lmnet; print(lmnet.from_pretrained('kvasir').pretrained_cfg)\"`.\n")
    summary = _summary_figure(report, run_dir, images, samples, split is not None)
    minutes_taken = (time.perf_counter() - t0) / 60
    rows = read_log(run_dir)
    final = int(RunFolder(run_dir).read_config()["epochs"])
    trained_line = training_sentence(len(rows), planned, final, replans,
                                     float(rows[-1]["lr"]) if rows else cfg.lr, cfg.time_budget)
    atomic_write_text(report / "README.md",
        "# lmnet demo report\n\n"
        f"{trained_line} The model is LM-Net at {image_size} x {image_size}, trained on "
        f"{len(json.loads((run_dir / 'split.json').read_text())['train'])} of the "
        f"{len(samples)} Kvasir-SEG images bundled with lmnet, then evaluated on "
        f"the {len(images)} test images. The whole demo took {minutes_taken:.1f} minutes.\n\n"
        + (f"![image, truth and predictions]({summary.name})\n\n`{summary.name}`: each test "
           "image, its ground truth, then each model's prediction outlined in yellow with the "
           "truth outlined in green.\n\n" if summary else "") +
        "These numbers show that the pipeline works end to end; a few minutes on a tiny sample are\n"
        "not the paper's recipe (200 epochs at 256 x 256 on the full dataset): do not compare them\n"
        "with published results.\n\n" + table + shipped_part +
        "\nFiles: `metrics.json`, `per_image.csv`, `predictions/masks/`, `predictions/overlays/`,\n"
        f"`predictions/areas.csv`; the training run (checkpoints, log.csv, TensorBoard) is in `{run_dir}`.\n\n"
        "Full dataset: `lmnet train --config configs/kvasir.yaml --data PATH/kvasir-seg`.\n")
    return report
