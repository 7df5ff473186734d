"""Pretrained folders: save / load round trip, bad folders, the Hub client's cache, and the CLI."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import lmnet
from lmnet.cli.main import main
from lmnet.models._hub import CONFIG_NAME, WEIGHTS_NAME


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = lmnet.create_model("lmnet", n_classes=2).eval()
    folder = tmp_path_factory.mktemp("pre") / "lmnet-test"
    model.save_pretrained(folder, card="# test model\n")
    return model, folder


def test_round_trip_gives_the_same_outputs(saved, tmp_path):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    assert model.deployed is False  # saving re-parameterises a copy, not the caller's model
    loaded = lmnet.from_pretrained(folder)
    assert loaded.deployed and not loaded.training
    assert loaded.pretrained_cfg["input_size"] == [3, 256, 256]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = lmnet.deploy(model)(x)  # same weights, deployed in fp32
        diff = float((loaded(x) - ref).abs().max())
    assert diff < 2e-3, diff  # fp16 storage (about 3 significant digits)
    exact = lmnet.create_model("lmnet").eval()
    exact.save_pretrained(tmp_path / "fp32", dtype=torch.float32)
    with torch.no_grad():
        same = lmnet.from_pretrained(tmp_path / "fp32", channels_last=False)  # same kernels too
        assert torch.equal(same(x), lmnet.deploy(exact)(x))


def test_bad_folders_are_clear_errors(saved, tmp_path):
    _, folder = saved
    broken = tmp_path / "no_weights"
    shutil.copytree(folder, broken)
    (broken / WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        lmnet.from_pretrained(broken)
    wrong = tmp_path / "wrong_model"
    shutil.copytree(folder, wrong)
    cfg = json.loads((wrong / CONFIG_NAME).read_text())
    (wrong / CONFIG_NAME).write_text(json.dumps({**cfg, "model": "no_such_model"}))
    with pytest.raises(ValueError, match="unknown model 'no_such_model'"):
        lmnet.from_pretrained(wrong)
    wide = tmp_path / "wrong_width"
    shutil.copytree(folder, wide)
    (wide / CONFIG_NAME).write_text(json.dumps({**cfg, "model_kwargs": {**cfg["model_kwargs"],
                                                                        "width": 24}}))
    with pytest.raises(ValueError, match="do not fit the model"):
        lmnet.from_pretrained(wide)
    (wide / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lmnet.from_pretrained(wide)
    with pytest.raises(ValueError, match="no pretrained model 'nowhere'"):
        lmnet.from_pretrained("nowhere")


def test_a_pickle_posing_as_weights_is_not_unpickled(saved, tmp_path):
    _, folder = saved
    evil = tmp_path / "evil"
    shutil.copytree(folder, evil)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    (evil / WEIGHTS_NAME).write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lmnet.from_pretrained(evil)
    assert not marker.exists()


def test_hub_id_through_the_client_cache(saved, tmp_path, monkeypatch):
    """No hub is reachable here: the repository lies in huggingface_hub's cache, read offline."""
    _, folder = saved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--lmnet-test"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(folder, repo / "snapshots" / sha)
    model = lmnet.from_pretrained("someorg/lmnet-test")
    assert model.pretrained_cfg["threshold"] == 0.5
    with pytest.raises(ValueError, match="cannot get 'someorg/other' from the Hugging Face Hub"):
        lmnet.from_pretrained("someorg/other")


def test_shipped_name_resolves_inside_the_package():
    from lmnet.deploy.pretrained import SHIPPED, resolve_pretrained

    assert "kvasir" in SHIPPED
    folder = resolve_pretrained("kvasir")
    assert sorted(p.name for p in folder.iterdir() if p.suffix != ".png") == [
        "README.md", CONFIG_NAME, WEIGHTS_NAME]
    card = (folder / "README.md").read_text()
    assert "## Test results" in card and "Not measured yet" not in card


def test_shipped_kvasir_model_segments_sample_images_it_never_saw(tmp_path):
    """``lmnet predict --weights kvasir`` with no network: on the shipped sample's images that the
    model's stored split kept out of training (its validation and test images), the masks it
    writes overlap the ground truth as a trained model's do (an untrained one scores about 0.3)."""
    from lmnet.engine.demo import sample_data_path

    split = lmnet.from_pretrained("kvasir").pretrained_config["split"]
    unseen = set(split["val"]) | set(split["test"])
    sample = sample_data_path()
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((sample / "images").iterdir()):
        if p.stem in unseen:
            shutil.copy(p, images / p.name)
    assert len(list(images.iterdir())) >= 5
    assert main(["predict", "--weights", "kvasir", str(images), "--out", str(tmp_path / "out"),
                 "--backend", "torch", "--quiet"]) == 0
    dice = []
    for p in sorted(images.iterdir()):
        pred = np.array(Image.open(tmp_path / "out" / "masks" / f"{p.stem}.png")) > 0
        truth = np.array(Image.open(sample / "masks" / p.name).convert("L")) > 127
        assert pred.shape == truth.shape  # written at each image's own size
        dice.append(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    assert np.mean(dice) > 0.7, dice


def test_export_pretrained_then_predict_and_evaluate_with_weights(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    out = tmp_path / "pre"
    assert main(["export", str(run), "--format", "pretrained", "--out", str(out)]) == 0
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["train_config"]["image_size"] == 32 and set(config["split"]) == {"train", "val", "test"}
    assert "lmnet evaluate --weights" in (out / "README.md").read_text()
    images = data / "images"
    # one engine for both (the automatic choice has its own tests; its probe converts each model)
    assert main(["predict", str(run), str(images), "--out", str(tmp_path / "a"), "--quiet",
                 "--backend", "torch"]) == 0
    assert main(["predict", "--weights", str(out), str(images), "--out", str(tmp_path / "b"),
                 "--quiet", "--backend", "torch"]) == 0
    differ = total = 0
    for mask in sorted((tmp_path / "a" / "masks").iterdir()):
        a = np.asarray(Image.open(mask))
        b = np.asarray(Image.open(tmp_path / "b" / "masks" / mask.name))
        differ, total = differ + int((a != b).sum()), total + a.size
    assert differ / total < 1e-3, (differ, total)  # fp16 weights: a few pixels at most
    capsys.readouterr()
    assert main(["evaluate", "--weights", str(out), "--data", str(data), "--out",
                 str(tmp_path / "ev"), "--quiet"]) == 0
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert result["all"]["n_images"] == len(config["split"]["test"])  # the stored split's test set
    assert main(["evaluate", str(run), "--weights", str(out)]) == 2
    assert "not both or neither" in capsys.readouterr().err


def test_model_card_reports_what_the_run_measured(tiny_run, tmp_path, capsys):
    """The card's numbers are the run's own: its test metrics in both conventions (with the
    commands), its epochs and time, its split; the validation curve is beside it."""
    run, data = tiny_run
    run = shutil.copytree(run, tmp_path / "run")
    out = tmp_path / "kvasir"
    assert main(["export", str(run), "--format", "pretrained", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "Not measured yet" in card and (out / "validation_curve.png").is_file()
    for grid in ("resized", "original"):
        assert main(["evaluate", str(run), "--grid", grid, "--quiet"]) == 0
    assert main(["export", str(run), "--format", "pretrained", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    for grid, flag in (("resized", ""), ("original", " --grid original")):
        m = json.loads((run / f"eval_test_{grid}" / "metrics.json").read_text())["all"]
        row = next(line for line in card.splitlines() if line.startswith(f"| {grid} |"))
        assert f"| {100 * m['fg_dice_mean']:.1f} |" in row and f"| {100 * m['paper_mdice']:.1f} |" in row
        assert f"`lmnet evaluate run --split test{flag}`" in row
    log_rows = (run / "log.csv").read_text().strip().splitlines()[1:]
    assert f"{len(log_rows)} of 1 epochs" in card
    split = json.loads((run / "split.json").read_text())
    assert f"test {len(split['test'])} images" in card and "not a medical device" in card
    assert "from_pretrained(\"kvasir\")" in card and "research and education" in card
    assert lmnet.from_pretrained(out).pretrained_cfg["input_size"] == [3, 32, 32]


def test_each_shipped_card_loads_its_model_by_its_shipped_name():
    """A shipped card's code and commands name the folder it ships in (``lmnet export`` writes
    the out folder's name; exporting elsewhere and copying leaves the wrong one)."""
    from pathlib import Path

    shipped = Path(lmnet.__file__).parent / "pretrained"
    cards = sorted(shipped.glob("*/README.md"))
    assert cards
    for card in cards:
        text, name = card.read_text(), card.parent.name
        assert f'lmnet.from_pretrained("{name}")' in text, card
        assert f"--weights {name} " in text and "--weights /" not in text, card
