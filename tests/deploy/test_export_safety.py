"""``lmnet export`` never overwrites what it reads or a trained model, and an interrupted export
leaves the earlier file: each case is a row of issue 27's table."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from lmnet._files import atomic_path, umask_mode
from lmnet.cli.main import main
from lmnet.deploy.export import check_export_target, export_checkpoint


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of a real one-epoch run folder (checkpoints, config.json, log.csv)."""
    return Path(shutil.copytree(tiny_run[0], tmp_path / "run"))


@pytest.mark.parametrize("fmt,target", [
    ("onnx", "checkpoint_last.pt"),          # --out RUN/checkpoint_last.pt (wrong ending too)
    ("torchscript", "checkpoint_last.pt"),   # a .pt ending, but a training checkpoint
    ("torchscript", "checkpoint_best.pt"),
    ("pretrained", "."),                     # --format pretrained --out RUN: its config.json
])
def test_export_refuses_to_overwrite_a_checkpoint_or_run_folder(run_copy, fmt, target, capsys):
    before = {p.name: _digest(p) for p in run_copy.iterdir() if p.is_file()}
    out = run_copy / target if target != "." else run_copy
    assert main(["export", str(run_copy), "--format", fmt, "--out", str(out), "--no-check"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert {p.name: _digest(p) for p in run_copy.iterdir() if p.is_file()} == before
    assert main(["evaluate", str(run_copy), "--quiet", "--out", str(run_copy.parent / "ev")]) == 0


def test_export_refuses_its_own_input_and_a_checkpoint_given_as_file(run_copy, capsys):
    ckpt = run_copy / "checkpoint_best.pt"
    before = _digest(ckpt)
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(ckpt)]) == 2
    assert "the model being exported" in capsys.readouterr().err
    other = run_copy.parent / "elsewhere.pt"  # a checkpoint outside any run folder
    shutil.copy(ckpt, other)
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(other)]) == 2
    assert "training checkpoint" in capsys.readouterr().err
    assert _digest(ckpt) == before and _digest(other) == before


@pytest.mark.parametrize("fmt,name,match", [
    ("onnx", "model.xml", "writes a .onnx file"),
    ("openvino", "model.onnx", "writes a .xml file"),
    ("torchscript", "model.onnx", "writes a .pt or .pth or .ts file"),
    ("pretrained", "model.onnx", "writes a folder"),
])
def test_export_checks_the_file_ending_against_the_format(run_copy, tmp_path, fmt, name, match):
    with pytest.raises(ValueError, match=match):
        check_export_target(fmt, tmp_path / name, run_copy)
    assert not (tmp_path / name).exists()


def test_export_to_a_folder_or_under_a_file_is_one_line(run_copy, tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    assert main(["export", str(run_copy), "--out", str(tmp_path / "dir"), "--no-check"]) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(run_copy), "--out", str(tmp_path / "afile" / "m.onnx"),
                 "--no-check"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err


def test_an_interrupted_export_keeps_the_earlier_file(run_copy, tmp_path, monkeypatch):
    out = tmp_path / "exports" / "model.onnx"
    export_checkpoint(run_copy, "onnx", out, check=False)
    before = _digest(out)

    def interrupted(model, args, f, *a, **k):  # writes half a file, then Ctrl-C
        Path(f).write_bytes(b"\x08\x01partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(run_copy, "onnx", out, check=False)
    assert _digest(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temporary left


def test_atomic_path_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    with atomic_path(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new"


def test_pretrained_export_files_follow_the_umask(run_copy, tmp_path):
    old = os.umask(0o022)
    try:
        folder = tmp_path / "pre"
        assert main(["export", str(run_copy), "--format", "pretrained", "--out", str(folder)]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes
    assert umask_mode() == 0o666 & ~old


def test_a_pretrained_folder_works_where_a_run_does(run_copy, tmp_path, capsys):
    folder = tmp_path / "pre"
    assert main(["export", str(run_copy), "--format", "pretrained", "--out", str(folder)]) == 0
    images = tmp_path / "imgs"
    images.mkdir()
    shutil.copy(next((tiny_data := Path(_data_of(run_copy))).glob("images/*")), images / "a.jpg")
    assert main(["predict", str(folder), str(images), "--out", str(tmp_path / "p"),
                 "--backend", "torch", "--quiet"]) == 0
    assert (tmp_path / "p" / "masks" / "a.png").is_file()
    assert main(["evaluate", str(folder), "--data", str(tiny_data), "--quiet",
                 "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "metrics.json").is_file()
    assert main(["export", str(folder), "--out", str(tmp_path / "m.onnx"), "--no-check"]) == 0
    assert main(["export", str(folder), "--format", "pretrained", "--out", str(tmp_path / "x")]) == 2
    assert "already a pretrained model" in capsys.readouterr().err
    # a checkpoint given to --weights: the hint names the positional argument, not a missing flag
    assert main(["predict", "--weights", str(run_copy / "checkpoint_best.pt"), str(images),
                 "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "positional argument" in err and "--checkpoint" not in err
    assert not (tmp_path / "q").exists()


def _data_of(run: Path) -> str:
    import json

    return json.loads((run / "config.json").read_text())["data"]
