"""Training end to end on tiny data: logs, checkpoints, exact resume, bad input, DDP, evaluate,
predict and the demo."""
from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lmnet.cli.main import main
from lmnet.config import TrainConfig, load_config
from lmnet.engine.train import Trainer, train
from tests.conftest import ROOT

SMALL = {"image_size": 32, "batch_size": 8, "epochs": 2, "split_ratios": [0.5, 0.25, 0.25],
         "lr": 3e-3}


def _params(run_dir, name="checkpoint_last.pt"):
    return torch.load(run_dir / name, map_location="cpu", weights_only=True)["model"]


def test_train_writes_a_complete_run_folder(disc_data, tmp_path):
    cfg = TrainConfig(data=str(disc_data), out=str(tmp_path), name="run", **SMALL)
    run = train(cfg, progress=False)
    for f in ("config.json", "split.json", "env.json", "log.csv", "checkpoint_last.pt",
              "checkpoint_best.pt"):
        assert (run / f).is_file(), f
    assert any((run / "tb").iterdir())
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0.0 <= float(r["val_paper_mdice"]) <= 1.0 for r in rows)
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "git_commit" in env and env["cpu"]
    sessions = [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines()]
    assert len(sessions) == 1 and sessions[0]["epochs_done"] == 0 and sessions[0]["cpu"] == env["cpu"]
    assert json.loads((run / "config.json").read_text())["image_size"] == 32
    ckpt = torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and TrainConfig.from_dict(ckpt["config"]) == cfg
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg, progress=False)


@pytest.mark.slow
def test_resume_after_interruption_is_exact(disc_data, tmp_path, monkeypatch):
    straight = train(TrainConfig(data=str(disc_data), out=str(tmp_path), name="straight", **SMALL),
                     progress=False)
    cfg = TrainConfig(data=str(disc_data), out=str(tmp_path), name="interrupted", **SMALL)
    from torch.utils.data.distributed import DistributedSampler

    original = DistributedSampler.set_epoch

    def ctrl_c_in_epoch_two(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        original(self, epoch)

    monkeypatch.setattr(DistributedSampler, "set_epoch", ctrl_c_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.setattr(DistributedSampler, "set_epoch", original)
    assert torch.load(tmp_path / "interrupted" / "checkpoint_last.pt",
                      weights_only=True)["epoch"] == 0
    resumed = train(cfg, resume=True, progress=False)
    _assert_same_weights(straight, resumed)
    rows = list(csv.DictReader((resumed / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def _assert_same_weights(run_a, run_b):
    a, b = _params(run_a), _params(run_b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_time_budget_stops_mid_epoch_and_resume_is_exact(disc_data, tmp_path):
    small = {**SMALL, "batch_size": 2}  # 4 steps an epoch
    straight = train(TrainConfig(data=str(disc_data), out=str(tmp_path), name="straight", **small),
                     progress=False)
    cfg = TrainConfig(data=str(disc_data), out=str(tmp_path), name="budget", **small, time_budget=1e-6)
    run = train(cfg, progress=False)  # stops after its first step
    assert list(csv.DictReader((run / "log.csv").open())) == []
    ckpt = torch.load(run / "checkpoint_last.pt", weights_only=True)
    assert ckpt["epoch"] == -1 and ckpt["partial"]["epoch"] == 0 and ckpt["partial"]["steps"] == 1
    calls = 1
    while len(list(csv.DictReader((run / "log.csv").open()))) < 2:
        train(cfg, resume=True, progress=False)  # one step a call, the run's own budget
        calls += 1
        assert calls <= 8
    assert calls == 8
    _assert_same_weights(straight, run)
    sessions = [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines()]
    assert len(sessions) == 8 and sessions[-1]["epochs_done"] == 1  # one line per start or resume


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_the_current_step_and_resume_is_exact(disc_data, tmp_path, ctrl_c_at_step,
                                                           signame):
    """Ctrl-C, or SIGTERM (a background job killed), saves the step in progress; resuming gives
    the weights of a run never interrupted."""
    import signal

    small = {**SMALL, "batch_size": 2}
    straight = train(TrainConfig(data=str(disc_data), out=str(tmp_path), name="straight", **small),
                     progress=False)
    cfg = TrainConfig(data=str(disc_data), out=str(tmp_path), name="ctrl_c", **small)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ctrl_c_at_step(3, getattr(signal, signame))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    assert {s: signal.getsignal(s) for s in before} == before  # handlers given back
    partial = torch.load(tmp_path / "ctrl_c" / "checkpoint_last.pt", weights_only=True)["partial"]
    assert partial["epoch"] == 0 and partial["steps"] == 3
    _assert_same_weights(straight, train(cfg, resume=True, progress=False))


@pytest.mark.parametrize("argv,match", [
    (["--epochs", "0"], "epochs must be > 0"),
    (["--image-size", "50"], "multiple of 16"),
    (["--set", "optimizer=sgd"], "unknown config key"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--set", "model.bridge=gft"], "bridge must be one of"),
    (["--batch-size", "8", "--grad-accum", "3"], "not divisible"),
])
def test_bad_configs_are_clear_errors(disc_data, tmp_path, capsys, argv, match):
    base = ["train", "--data", str(disc_data), "--out", str(tmp_path), "--quiet"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_unusable_data_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    assert "cannot tell the layout" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2


def test_config_files_load_with_the_paper_recipe():
    for name in ("kvasir", "busi", "lgg"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", {"epochs": 1})
        assert cfg.format == name and cfg.epochs == 1
        assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.image_size) == (1e-3, 1e-4, 32, 256)
    assert load_config(ROOT / "configs" / "kvasir.yaml").epochs == 200


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(disc_data, tmp_path):
    common = ["--data", str(disc_data), "--image-size", "32", "--batch-size", "8", "--epochs", "1",
              "--set", "model.drop=0.0", "--set", "split_ratios=[0.5,0.25,0.25]", "--out",
              str(tmp_path), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "lmnet", "train", *common, "--name", "ddp"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "lmnet", "train", *common, "--grad-accum", "2",
                             "--name", "single"], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    report = json.loads((tmp_path / "ddp" / "ddp.json").read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert report["max_param_diff_across_replicas"] == 0.0
    a, b = _params(tmp_path / "ddp"), _params(tmp_path / "single")
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    worst = max(float((a[k] - b[k]).abs().max()) for k in params)
    assert worst < 1e-5, worst
    last = torch.load(tmp_path / "ddp" / "checkpoint_last.pt", weights_only=True)["model"]
    moved = max(float((a[k] - last[k]).abs().max()) for k in params)
    assert moved == 0.0  # rank 0 saved what it trained
    init = __import__("lmnet").create_model("lmnet", drop=0.0).state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in params) > 1e-4  # it did train


@pytest.fixture(scope="module")
def trained_run(disc_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return train(TrainConfig(data=str(disc_data), out=str(out), name="r", **SMALL), progress=False)


def test_evaluate_writes_reports(trained_run, capsys):
    for grid in ("resized", "original"):
        assert main(["evaluate", str(trained_run), "--grid", grid, "--quiet"]) == 0
        out = trained_run / f"eval_test_{grid}"
        metrics = json.loads((out / "metrics.json").read_text())
        split = json.loads((trained_run / "split.json").read_text())
        assert metrics["all"]["n_images"] == len(split["test"]) == 4
        assert metrics["grid"] == grid and "paper_mdice" in metrics["all"]
        rows = list(csv.DictReader((out / "per_image.csv").open()))
        assert sorted(r["name"] for r in rows) == sorted(split["test"])
        if grid == "original":  # each image's own size, not the training size
            assert {int(r["height"]) for r in rows} != {32}
    printed = capsys.readouterr().out
    assert "| mDice | mIoU |" in printed and "mDice/mIoU: the paper's" in printed


def test_predict_writes_masks_at_original_size(trained_run, disc_data, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sorted((disc_data / "images").glob("*.png"))[:3]:
        (inputs / p.name).write_bytes(p.read_bytes())
    Image.fromarray(np.zeros((37, 53), np.uint8)).save(inputs / "grey_odd_size.jpg")
    assert main(["predict", str(trained_run), str(inputs), "--out", str(tmp_path / "pred"),
                 "--quiet"]) == 0
    for src in inputs.iterdir():
        mask = Image.open(tmp_path / "pred" / "masks" / f"{src.stem}.png")
        assert mask.size == Image.open(src).size
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert (tmp_path / "pred" / "overlays" / f"{src.stem}.png").is_file()
    rows = list(csv.DictReader((tmp_path / "pred" / "areas.csv").open()))
    assert len(rows) == 4 and all(int(r["lesion_area_px"]) >= 0 for r in rows)
    (inputs / "corrupt.png").write_bytes(b"nope")
    assert main(["predict", str(trained_run), str(inputs), "--out", str(tmp_path / "pred2"),
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "corrupt.png" in err and "Traceback" not in err
    assert len(list((tmp_path / "pred2" / "masks").iterdir())) == 4


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    from lmnet.engine.demo import run_demo, sample_data_path

    assert len(list((sample_data_path() / "images").glob("*.jpg"))) == 40
    report = run_demo(tmp_path / "demo", minutes=0.02, image_size=32, epochs=1, progress=False)
    for f in ("README.md", "metrics.json", "metrics.md", "per_image.csv"):
        assert (report / f).is_file(), f
    # the held-out images are those the shipped model never trained on (its validation and test)
    import lmnet

    split = lmnet.from_pretrained("kvasir").pretrained_config["split"]
    unseen = {p.stem for p in (sample_data_path() / "images").glob("*.jpg")} & {
        *split["val"], *split["test"]}
    overlays = {p.stem for p in (report / "predictions" / "overlays").glob("*.png")}
    assert overlays == unseen and len(unseen) >= 3
    assert len(list((report / "predictions_shipped_model" / "masks").glob("*.png"))) == len(unseen)
    # A second demo into the same folder replaces the earlier run; on a machine too slow for the
    # requested epochs (plan_epochs says 4) it trains fewer, with a complete schedule.
    import lmnet.engine.demo as demo

    monkeypatch.setattr(demo, "plan_epochs", lambda cfg, n, minutes, most: 4)
    # the shipped model's half of the report is checked above: here the demo's own split
    monkeypatch.setattr(demo, "_shipped_split", lambda samples: None)
    # minutes: far more than 4 epochs at 32 px take, so that no re-plan shortens them on a busy machine
    report = run_demo(tmp_path / "demo", minutes=3.0, image_size=32, epochs=25, progress=False)
    rows = list(csv.DictReader((tmp_path / "demo" / "run" / "log.csv").open()))
    assert len(rows) == 4 and float(rows[-1]["lr"]) == 0.0  # the cosine schedule ended
    assert "trained for 4 of 4 planned epochs: the cosine schedule completed" in (
        report / "README.md").read_text()


@pytest.mark.slow
def test_demo_shows_the_shipped_model_beside_its_own(tmp_path, monkeypatch, tiny_checkpoint):
    """With a shipped model, the demo holds out the sample images it never trained on and reports
    both models on them (a stand-in model with a known split here)."""
    import lmnet.deploy.pretrained as pre
    from lmnet.deploy import load_checkpoint
    from lmnet.engine.demo import run_demo, sample_data_path
    from lmnet.models import create_model

    names = sorted(p.stem for p in (sample_data_path() / "images").glob("*.jpg"))
    cfg = TrainConfig.from_dict(load_checkpoint(tiny_checkpoint / "checkpoint_best.pt")["config"])
    model = create_model("lmnet")
    model.load_state_dict(load_checkpoint(tiny_checkpoint / "checkpoint_best.pt")["model"])
    folder = pre.save_pretrained(model, tmp_path / "shipped", "lmnet", {}, pre.pretrained_cfg_of(cfg),
                                 extra={"split": {"train": names[:30], "val": names[30:35],
                                                  "test": names[35:]}})
    monkeypatch.setattr(pre, "resolve_pretrained", lambda name, revision=None: folder)
    report = run_demo(tmp_path / "demo", minutes=0.3, image_size=32, epochs=2, progress=False)
    split = json.loads((tmp_path / "demo" / "run" / "split.json").read_text())
    assert sorted(split["test"]) == names[30:]  # the shipped model's unseen images, all of them
    text = (report / "README.md").read_text()
    assert "shipped LM-Net (`--weights kvasir`)" in text and "neither model trained on" in text
    assert "![image, truth and predictions](summary.png)" in text
    with Image.open(report / "summary.png") as im:  # image | truth | demo model | shipped model
        assert im.size[0] > im.size[1] * 0.8
    assert len(list((report / "predictions_shipped_model" / "masks").iterdir())) == 10
    ship = json.loads((report / "compare_original_size" / "shipped_model" / "metrics.json").read_text())
    assert ship["all"]["n_images"] == 10


def test_demo_plans_its_epochs_from_measured_speed():
    """A machine too slow for the requested epochs trains fewer (the demo that does so:
    ``test_demo_runs_end_to_end``)."""
    from lmnet.engine.demo import plan_epochs

    cfg = TrainConfig(data="x", image_size=32, batch_size=8)
    assert plan_epochs(cfg, 28, minutes=1e-6, most=25) == 3
    assert plan_epochs(cfg, 28, minutes=1e-6, most=2) == 2
    assert plan_epochs(cfg, 28, minutes=60, most=25) == 25


def test_a_replanned_run_ends_its_schedule_at_the_new_length(disc_data, tmp_path):
    """``train(replan=...)`` shortens the cosine schedule mid-run (the demo on a machine slower
    than measured): the run stops at the new length with the learning rate at its minimum."""
    from lmnet.engine.train import train

    calls = []

    def replan(done, seconds):
        calls.append((done, seconds))
        return 2 if done == 1 else None

    cfg = TrainConfig(data=str(disc_data), image_size=32, batch_size=8, epochs=6,
                      split_ratios=[0.5, 0.25, 0.25], out=str(tmp_path), name="r")
    run = train(cfg, progress=False, replan=replan)
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and float(rows[-1]["lr"]) == 0.0
    assert float(rows[0]["lr"]) < cfg.lr
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert [c[0] for c in calls] == [1] and calls[0][1] > 0


def test_the_demo_report_says_what_its_training_did():
    from lmnet.engine.demo import training_sentence

    done = training_sentence(16, 16, 16, [], 0.0, 5.25)
    assert "16 of 16 planned epochs: the cosine schedule completed" in done
    cut = training_sentence(5, 16, 16, [], 0.00085, 5.25)
    assert "5 of 16 planned epochs" in cut and "did **not** complete" in cut
    assert "time cap of 5.25 minutes" in cut and "still 0.00085" in cut and "completed." not in cut
    replanned = training_sentence(8, 16, 8, [(2, 16, 8)], 0.0, 5.25)
    assert "8 of 8 planned epochs (re-planned after epoch 2, which ran slower than measured: " \
           "16 -> 8 epochs)" in replanned
    twice = training_sentence(9, 25, 9, [(3, 25, 12), (5, 12, 9)], 0.0, 5.25)
    assert "re-planned after epochs 3, 5, which ran slower than measured: 25 -> 12 -> 9" in twice
    assert replanned.endswith("the cosine schedule completed.")


def test_cpu_options_bf16_and_channels_last(disc_data, tmp_path, monkeypatch, caplog):
    import lmnet.engine.train as train_module

    monkeypatch.setattr(train_module, "amx_bf16", lambda: False)  # as on most CPUs
    cfg = TrainConfig(data=str(disc_data), out=str(tmp_path), name="bf16", bf16=True,
                      channels_last=True, **{**SMALL, "epochs": 1})
    with caplog.at_level(logging.WARNING, logger="lmnet"):
        run = train(cfg, progress=False)
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert len(rows) == 1 and np.isfinite(float(rows[0]["train_loss"]))
    notes = [r.getMessage() for r in caplog.records if "--bf16 on a CPU without AMX" in r.getMessage()]
    assert len(notes) == 1 and "slower" in notes[0]


def test_the_bf16_note_is_for_cpus_without_amx(monkeypatch):
    import lmnet.engine.train as train_module

    def note(bf16, amx, device="cpu"):
        monkeypatch.setattr(train_module, "amx_bf16", lambda: amx)
        trainer = Trainer(TrainConfig(data="unused", bf16=bf16), progress=False)
        trainer.device = torch.device(device)
        return trainer.bf16_note()

    assert note(True, False) is not None
    assert note(True, True) is None and note(False, False) is None
    assert note(True, False, device="meta") is None  # CUDA and other devices: no CPU note


def test_evaluate_and_predict_in_bf16(trained_run, tmp_path, disc_data):
    assert main(["evaluate", str(trained_run), "--precision", "bf16", "--quiet"]) == 0
    metrics = json.loads((trained_run / "eval_test_resized_bf16" / "metrics.json").read_text())
    assert metrics["precision"] == "bf16" and 0.0 <= metrics["all"]["fg_dice_mean"] <= 1.0
    src = sorted((disc_data / "images").glob("*.png"))[0]
    assert main(["predict", str(trained_run), str(src), "--precision", "bf16", "--out",
                 str(tmp_path / "p"), "--quiet"]) == 0
    assert (tmp_path / "p" / "masks" / f"{src.stem}.png").is_file()
    assert main(["predict", str(trained_run), str(src), "--precision", "bf16", "--backend", "onnx",
                 "--out", str(tmp_path / "q"), "--quiet"]) == 2


def test_every_config_file_loads():
    """Every recipe in configs/ is a valid TrainConfig (a typo in a key is an error here, not in
    the first minute of a long run)."""
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        cfg = load_config(path)
        assert cfg.format and path.stem.startswith(cfg.format), path
