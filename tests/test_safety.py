"""No code runs from a file a user hands lmnet: crafted checkpoints for every command that reads one."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmnet.cli.main import main
from lmnet.config import TrainConfig
from lmnet.engine.train import train


class _Payload:
    """Unpickling this touches ``marker``: a stand-in for any command an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _craft(path: Path, marker: Path, base: dict | None = None) -> Path:
    """A checkpoint that looks right (config, weights) but carries the payload in one entry."""
    ckpt = dict(base or {})
    ckpt["val"] = _Payload(marker)
    torch.save(ckpt, path)
    return path


def test_the_crafted_file_really_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "ran"
    path = _craft(tmp_path / "evil.pt", marker, {"model": {}, "config": {}})
    torch.load(path, weights_only=False)  # what lmnet used to do
    assert marker.exists()


@pytest.fixture(scope="module")
def real_run(disc_data, tmp_path_factory):
    cfg = TrainConfig(data=str(disc_data), out=str(tmp_path_factory.mktemp("safe")), name="run",
                      image_size=32, batch_size=8, epochs=1, split_ratios=[0.5, 0.25, 0.25])
    return train(cfg, progress=False)


@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "resume"])
def test_no_command_runs_code_from_a_checkpoint(command, real_run, disc_data, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    marker = tmp_path / "ran"
    good = torch.load(run / "checkpoint_last.pt", weights_only=True)
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        _craft(run / name, marker, good)
    config_before = (run / "config.json").read_text()
    files_before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    argv = {"predict": ["predict", str(run), str(disc_data / "images"), "--out", str(tmp_path / "o")],
            "evaluate": ["evaluate", str(run)],
            "export": ["export", str(run), "--out", str(tmp_path / "m.onnx")],
            "resume": ["train", "--resume", str(run), "--quiet"]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "code from the file ran"
    assert "never code" in err and "it asks to run code" in err and "GLOBAL" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (run / "config.json").read_text() == config_before  # a failed command changes nothing
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == files_before
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.onnx").exists()


def test_checkpoints_load_without_pickle_and_old_ones_still_load(real_run, tmp_path):
    from lmnet.deploy.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = torch.load(real_run / "checkpoint_last.pt", weights_only=True)  # plain types only
    assert isinstance(ckpt["rng"]["numpy"]["keys"], torch.Tensor)
    # lmnet 0.1.0 stored numpy's RNG state as a tuple with an ndarray: still loads, nothing more
    import numpy as np

    old = dict(ckpt, rng=dict(ckpt["rng"], numpy=np.random.get_state()))
    torch.save(old, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["rng"]["numpy"][0] == "MT19937"
    model, cfg = model_from_checkpoint(tmp_path / "old.pt")
    reference, _ = model_from_checkpoint(real_run / "checkpoint_last.pt")
    x = torch.randn(1, cfg.in_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():  # the same weights as the checkpoint it was made from
        torch.testing.assert_close(model(x), reference(x))


def test_weights_of_another_model_are_a_short_clear_error(real_run, tmp_path, capsys):
    ckpt = torch.load(real_run / "checkpoint_last.pt", weights_only=True)
    ckpt["config"] = {**ckpt["config"], "model_args": {"width": 24}}
    torch.save(ckpt, tmp_path / "wide.pt")
    assert main(["export", str(tmp_path / "wide.pt"), "--out", str(tmp_path / "m.pt"),
                 "--format", "torchscript"]) == 2
    err = capsys.readouterr().err
    assert "do not fit the model" in err and "of another shape" in err
    assert len(err.splitlines()) <= 2 and "Traceback" not in err
