"""Loud load checks and one-line errors: a model, config or mask that would give meaningless
results with exit code 0 is refused or warned about (rows of issue 27's table)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lmnet.cli.main import main
from lmnet.config import TrainConfig


def _one_line_error(capsys, *parts: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err, err
    for part in parts:
        assert part in err, err
    return err


def test_nan_weights_are_refused(tiny_checkpoint, tmp_path, capsys):
    ckpt = torch.load(tiny_checkpoint / "checkpoint_best.pt", weights_only=True)
    first = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][first] = torch.full_like(ckpt["model"][first], float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    assert main(["predict", str(tmp_path / "nan.pt"), str(tmp_path / "img"), "--out",
                 str(tmp_path / "o"), "--backend", "torch"]) == 2
    _one_line_error(capsys, "NaN or infinite", first)
    assert not (tmp_path / "o").exists()


def test_zero_std_in_a_pretrained_config_is_refused(tmp_path, capsys):
    from lmnet.deploy.pretrained import resolve_pretrained

    folder = Path(shutil.copytree(resolve_pretrained("kvasir"), tmp_path / "kv"))
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["std"] = [0, 0, 0]
    config.pop("train_config", None)
    (folder / "config.json").write_text(json.dumps(config))
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    assert main(["predict", "--weights", str(folder), str(tmp_path / "img"), "--out",
                 str(tmp_path / "o"), "--backend", "torch"]) == 2
    _one_line_error(capsys, "std must be > 0")


def test_an_export_whose_outputs_differ_from_its_config_is_refused(tmp_path, capsys):
    """An ONNX file of a 1-class model carrying the metadata of a 2-class config."""
    from lmnet.deploy.convert import export_onnx
    from lmnet.models import create_model, deploy

    cfg = TrainConfig(data="x", image_size=32, n_classes=2)
    model = deploy(create_model("lmnet", n_classes=1)).eval()
    path = export_onnx(model, tmp_path / "m.onnx", 3, 32,
                       metadata={"lmnet_config": json.dumps(cfg.to_dict())})
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    assert main(["predict", str(path), str(tmp_path / "img"), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "says 2 classes", "(1, 1, 32, 32)")


def test_a_broken_openvino_ir_names_the_problem(tmp_path, capsys):
    (tmp_path / "m.xml").write_text("<net><broken")
    assert main(["evaluate", str(tmp_path / "m.xml"), "--data", str(tmp_path)]) == 2
    err = _one_line_error(capsys, "not a readable OpenVINO IR")
    assert "core.cpp" not in err.splitlines()[-1]


def test_a_checkpoint_whose_config_is_not_a_mapping(tiny_checkpoint, tmp_path, capsys):
    ckpt = torch.load(tiny_checkpoint / "checkpoint_best.pt", weights_only=True)
    ckpt["config"] = [1, 2, 3]
    torch.save(ckpt, tmp_path / "bad.pt")
    assert main(["export", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    _one_line_error(capsys, "'config' is a list")


@pytest.mark.parametrize("key,value,message", [
    ("lr", ".nan", "lr must be a finite number"),
    ("weight_decay", ".inf", "weight_decay must be a finite number"),
    ("time_budget", ".nan", "time_budget must be > 0"),
])
def test_non_finite_recipe_values_are_refused_before_a_run_folder(disc_data, tmp_path, capsys,
                                                                   key, value, message):
    (tmp_path / "c.yaml").write_text(f"{key}: {value}\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--data", str(disc_data),
                 "--out", str(tmp_path / "runs"), "--quiet"]) == 2
    _one_line_error(capsys, message)
    assert not (tmp_path / "runs").exists()


def test_experiment_settings_of_the_wrong_type(tmp_path, capsys):
    (tmp_path / "x.yaml").write_text(yaml.safe_dump({"name": "x", "settings": {"gpu": 5}}))
    assert main(["experiment", str(tmp_path / "x.yaml"), "--dry-run"]) == 2
    _one_line_error(capsys, "settings: 'gpu' must be a mapping")


def _label_map_dataset(root: Path, n: int = 8) -> Path:
    """A generic dataset whose masks are 0/1/2 label maps (lesion 1, another structure 2), but
    for two 0/255 masks (so that training has lesion pixels at all)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        labels = np.zeros((32, 32), np.uint8)
        labels[4:14, 4:14], labels[18:28, 18:28] = (1, 2) if i >= 2 else (255, 0)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            root / "images" / f"c{i}.png")
        Image.fromarray(labels).save(root / "masks" / f"c{i}.png")
    return root


def test_label_map_masks_warn_in_train_and_score(tmp_path, caplog):
    data = _label_map_dataset(tmp_path / "data")
    with caplog.at_level("WARNING", logger="lmnet"):
        assert main(["train", "--data", str(data), "--epochs", "1", "--image-size", "32",
                     "--batch-size", "4", "--out", str(tmp_path / "runs"), "--quiet"]) == 0
    assert "look like label maps" in caplog.text and "values 0, 1, 2" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmnet"):
        assert main(["score", str(data / "masks"), str(data / "masks"), "--out",
                     str(tmp_path / "score"), "--quiet"]) == 0
    assert "6 of 8 predicted masks look like label maps" in caplog.text
    assert "6 of 8 truth masks look like label maps" in caplog.text


@pytest.mark.slow
def test_dry_run_of_the_paper_recipe_needs_little_memory(disc_data, tmp_path):
    """Batch 32 at 256 x 256 (the default recipe) grew a dry run to 22.6 GB; now it times
    micro-batches of 2 images and estimates the rest."""
    (tmp_path / "x.yaml").write_text(yaml.safe_dump({
        "name": "x", "data": str(disc_data), "out": str(tmp_path / "results"),
        "recipe": {"epochs": 2}}))
    code = ("import resource, sys; from lmnet.cli.main import main; "
            f"rc = main(['experiment', {str(tmp_path / 'x.yaml')!r}, '--dry-run', '--threads', '1']); "
            "print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    peak_gib = int(done.stdout.split("peak_kib")[-1]) / 2**20
    assert peak_gib < 6, peak_gib  # a full micro-batch of 32 needs about 23 GiB
    assert "estimated" in done.stdout
    runs = tmp_path / "results" / "x" / "runs"
    assert not any(runs.rglob("log.csv")) and not any(runs.rglob("checkpoint_*.pt"))


def test_a_plan_that_does_not_fit_in_memory_says_so(disc_data, tmp_path, monkeypatch, capsys):
    import lmnet.runtime

    (tmp_path / "x.yaml").write_text(yaml.safe_dump({
        "name": "x", "data": str(disc_data), "out": str(tmp_path / "results"),
        "recipe": {"epochs": 1, "image_size": 64, "batch_size": 8}}))
    monkeypatch.setattr(lmnet.runtime, "available_memory", lambda: 50 * 2**20)  # 50 MiB free
    assert main(["experiment", str(tmp_path / "x.yaml"), "--dry-run"]) == 0
    assert "would not fit in this machine's memory" in capsys.readouterr().out
    assert main(["experiment", str(tmp_path / "x.yaml")]) == 2  # a real run refuses to start
    _one_line_error(capsys, "would not fit", "grad_accum")
    assert not any((tmp_path / "results").rglob("checkpoint_*.pt"))


def test_step_memory_grows_with_the_micro_batch():
    from lmnet.engine.train import step_memory

    one = step_memory(TrainConfig(data="x", image_size=64, batch_size=1))
    eight = step_memory(TrainConfig(data="x", image_size=64, batch_size=8))
    accum = step_memory(TrainConfig(data="x", image_size=64, batch_size=8, grad_accum=4))
    assert 4 * one < eight < 8 * one and one < accum < eight / 3
