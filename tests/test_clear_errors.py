"""Bad input gets a short message naming the problem, and a failed command changes nothing."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from lmnet.cli.main import main
from lmnet.config import TrainConfig
from lmnet.engine.train import train

SMALL = {"image_size": 32, "batch_size": 8, "epochs": 1, "split_ratios": [0.5, 0.25, 0.25]}


@pytest.mark.parametrize("yaml_text,message", [
    ("epochs: 1.5", "epochs must be a whole number, got 1.5"),
    ("split_ratios: 0.8", "split_ratios must be a list of numbers, got 0.8"),
    ('channels_last: "false"', "channels_last must be true or false, got 'false'"),
    ("progressive_size: 24\nprogressive_epochs: 1", "progressive_size must be a multiple of 16"),
])
def test_config_values_of_the_wrong_type(disc_data, tmp_path, capsys, yaml_text, message):
    (tmp_path / "c.yaml").write_text(yaml_text + "\n")
    argv = ["train", "--config", str(tmp_path / "c.yaml"), "--data", str(disc_data), "--out",
            str(tmp_path / "runs"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def finished_run(disc_data, tmp_path_factory):
    cfg = TrainConfig(data=str(disc_data), out=str(tmp_path_factory.mktemp("err")), name="run", **SMALL)
    return train(cfg, progress=False)


def test_corrupt_checkpoint_on_resume_changes_nothing(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "checkpoint_last.pt").write_bytes(b"\x80\x02 truncated")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint_last.pt is not a readable lmnet checkpoint" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_says_which_flags_it_ignores(finished_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with caplog.at_level("WARNING"):
        assert main(["train", "--resume", str(run), "--lr", "0.5", "--epochs", "1", "--quiet"]) == 0
    assert "ignored: lr=0.5" in caplog.text and "epochs" in caplog.text


def test_a_corrupt_test_image_stops_the_run_before_training(disc_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(disc_data, data)
    cfg = TrainConfig(data=str(data), **SMALL)
    from lmnet.data.layouts import discover
    from lmnet.data.splits import make_split

    split = make_split(discover(data)[1], cfg.split_ratios, cfg.seed)
    victim = data / "images" / f"{split['test'][0]}.png"  # one image of the test split
    victim.write_bytes(b"not a png")
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "runs"), "--image-size", "32",
            "--epochs", "1", "--batch-size", "8", "--set", "split_ratios=[0.5,0.25,0.25]", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "test split cannot be read" in err and victim.name in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # before anything was trained or written


def test_onnx_export_without_the_extra_names_it(finished_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    assert main(["export", str(finished_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'lmnet[export]'" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_score_against_busi_as_downloaded(busi_mini, tmp_path, capsys):
    """Predictions named like the images; truth = a BUSI class folder (images beside NAME_mask*.png)."""
    from lmnet.data.io import read_mask
    from lmnet.data.layouts import discover

    pred = tmp_path / "pred"
    pred.mkdir()
    samples = [s for s in discover(busi_mini)[1] if s.group == "benign"]
    for s in samples:  # perfect predictions: the union of each image's masks
        union = np.logical_or.reduce([read_mask(m) for m in s.masks])
        Image.fromarray(union.astype(np.uint8) * 255).save(pred / f"{s.image.stem}.png")
    assert main(["score", str(pred), str(busi_mini / "benign"), "--out", str(tmp_path / "r"),
                 "--quiet"]) == 0
    import json

    result = json.loads((tmp_path / "r" / "metrics.json").read_text())["all"]
    assert result["n_images"] == len(samples)  # one per image, not one per mask file
    assert result["fg_dice_mean"] == 1.0  # the image with two masks is scored on their union
