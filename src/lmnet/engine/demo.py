"""``lmnet demo``: train LM-Net for a few minutes on the bundled Kvasir-SEG sample, evaluate it and
write a report folder with the metrics table and overlays."""
from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path

from lmnet.config import TrainConfig
from lmnet.data.layouts import discover
from lmnet.engine.evaluate import evaluate_run
from lmnet.engine.predict import predict_files
from lmnet.engine.train import step_seconds, train
from lmnet.metrics import markdown_table

__all__ = ["sample_data_path", "run_demo"]


def sample_data_path() -> Path:
    """Folder of the bundled Kvasir-SEG sample (40 images and masks)."""
    return Path(str(resources.files("lmnet") / "sample_data" / "kvasir_sample"))


def plan_epochs(cfg: TrainConfig, train_images: int, minutes: float, most: int) -> int:
    """How many epochs (at most ``most``, at least 3 unless ``most`` is smaller) fit in ``minutes`` on this machine, now.

    Times a training step of the demo's model and batch (:func:`~lmnet.engine.train.step_seconds`)
    and allows a quarter more for data loading and validation. Measured, so a slow or busy machine trains
    fewer epochs but still completes the learning-rate schedule.
    """
    steps = -(-train_images // cfg.batch_size)
    epoch_s = 1.25 * steps * step_seconds(cfg)
    return max(min(3, most), min(most, int(minutes * 60 / epoch_s)))


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
        saved = run_dir / "config.json"
        if not saved.is_file() or json.loads(saved.read_text()).get("data") != str(data):
            raise ValueError(f"{run_dir} exists and is not an earlier demo run; choose another --out")
        shutil.rmtree(run_dir)
    cfg = TrainConfig(data=str(data), format="kvasir", image_size=image_size, batch_size=8,
                      epochs=epochs, time_budget=1.5 * minutes, split_ratios=[0.7, 0.15, 0.15],
                      out=str(out), name="run", seed=0)
    planned = plan_epochs(cfg, round(0.7 * 40), minutes, epochs)
    if planned < epochs and progress:
        print(f"this machine is slower than the demo assumes: training {planned} epochs instead of "
              f"{epochs}, so that the learning-rate schedule completes within {minutes} minutes")
    cfg = cfg.replace(epochs=planned)
    train(cfg, progress=progress)
    report = out / "report"
    result, _ = evaluate_run(run_dir, split="test", out=report, progress=False)
    _, samples, _ = discover(data, "kvasir")
    test = set(json.loads((run_dir / "split.json").read_text())["test"])
    images = [s.image for s in samples if s.name in test]
    predict_files(run_dir, images, report / "predictions", progress=False)
    table = markdown_table(result)
    minutes_taken = (time.perf_counter() - t0) / 60
    (report / "README.md").write_text(
        "# lmnet demo report\n\n"
        f"LM-Net trained for {cfg.epochs} epochs (a complete cosine schedule planned to fit in "
        f"{minutes} minutes) at {image_size} x {image_size} on "
        f"{len(samples)} Kvasir-SEG images bundled with lmnet (split 70/15/15 %), then evaluated on "
        f"the {len(images)} test images. The whole demo took {minutes_taken:.1f} minutes.\n\n"
        "These numbers show that the pipeline works end to end; a few minutes on a tiny sample are\n"
        "not the paper's recipe (200 epochs at 256 x 256 on the full dataset): do not compare them\n"
        "with published results.\n\n" + table +
        "\nFiles: `metrics.json`, `per_image.csv`, `predictions/masks/`, `predictions/overlays/`,\n"
        f"`predictions/areas.csv`; the training run (checkpoints, log.csv, TensorBoard) is in `{run_dir}`.\n\n"
        "Full dataset: `lmnet train --config configs/kvasir.yaml --data PATH/kvasir-seg`.\n")
    return report
