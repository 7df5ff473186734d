"""Test-time augmentation, mask clean-up, probabilities out, and scoring that names what it scores."""
from __future__ import annotations

import csv
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lmnet.cli.main import main
from lmnet.deploy.postprocess import PostProcess, clean_mask, count_lesions, tta_probabilities
from lmnet.engine.evaluate import evaluate_run
from lmnet.engine.predict import predict_files


def _position_model(weights: np.ndarray):
    """An engine-like function whose lesion logit depends on where a pixel is: not flip-invariant."""
    def run(x: np.ndarray) -> np.ndarray:
        fg = x[:, 0] * weights
        return np.stack([np.zeros_like(fg), fg], 1).astype(np.float32)
    return run


def test_tta_averages_the_flipped_predictions_flipped_back():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 8)).astype(np.float32)
    x = torch.from_numpy(rng.normal(size=(2, 3, 8, 8)).astype(np.float32))
    run = _position_model(w)

    def prob(a: np.ndarray) -> np.ndarray:  # softmax over (0, fg) = sigmoid(fg)
        return 1 / (1 + np.exp(-run(a)[:, 1]))

    xn = x.numpy()
    expected = (prob(xn) + prob(xn[..., ::-1].copy())[..., ::-1] + prob(xn[:, :, ::-1].copy())[:, ::-1]
                + prob(xn[:, :, ::-1, ::-1].copy())[:, ::-1, ::-1]) / 4
    got = tta_probabilities(run, x, ("identity", "hflip", "vflip", "hvflip"))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    plain = tta_probabilities(run, x, ("identity",)).numpy()
    np.testing.assert_allclose(plain, prob(xn), atol=1e-6)
    assert np.abs(plain - expected).max() > 1e-3  # the model is not flip-invariant: TTA matters
    assert PostProcess(tta="flips").transforms == ("identity", "hflip", "vflip", "hvflip")
    with pytest.raises(ValueError, match="--tta must be one of"):
        PostProcess(tta="rotate")


def test_clean_mask_keeps_the_largest_and_drops_small_lesions():
    m = np.zeros((12, 12), bool)
    m[1:3, 1:3] = True            # 4 pixels
    m[3, 3] = True                # touches the first by a corner: one 5-pixel lesion (8-connected)
    m[6:11, 6:10] = True          # 20 pixels
    m[0, 11] = True               # 1 pixel
    assert count_lesions(m) == 3
    largest = clean_mask(m, largest=True)
    assert largest.sum() == 20 and largest[6:11, 6:10].all()
    no_small = clean_mask(m, min_pixels=5)
    assert no_small.sum() == 25 and count_lesions(no_small) == 2 and not no_small[0, 11]
    assert not clean_mask(m, largest=True, min_pixels=21).any()  # the largest is too small too
    batch = clean_mask(np.stack([m, np.zeros_like(m)]), min_pixels=2)
    assert batch.shape == (2, 12, 12) and batch[0].sum() == 25 and not batch[1].any()
    assert (clean_mask(m) == m).all()


def _copy_images(src, folder, n):
    folder.mkdir()
    for p in sorted((src / "images").glob("*.jpg"))[:n]:
        shutil.copy(p, folder / p.name)
    return folder


def test_predict_tta_cleanup_and_probabilities(tiny_checkpoint, kvasir_mini, tmp_path):
    images = _copy_images(kvasir_mini, tmp_path / "in", 3)
    plain = predict_files(tiny_checkpoint, [images], tmp_path / "plain", progress=False,
                          engine="torch", save_probabilities="png")
    assert len(plain.written) == 3
    for mask_path in sorted((tmp_path / "plain" / "masks").iterdir()):
        mask = np.asarray(Image.open(mask_path)) > 0
        prob = np.asarray(Image.open(tmp_path / "plain" / "probabilities" / mask_path.name))
        assert prob.dtype == np.uint16 and prob.shape == mask.shape
        p = prob / 65535
        decided = np.abs(p - 0.5) > 1e-4  # the PNG's rounding aside
        assert (mask[decided] == (p[decided] > 0.5)).all()
    with open(tmp_path / "plain" / "areas.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        mask = np.asarray(Image.open(r["mask"])) > 0
        assert int(r["n_lesions"]) == count_lesions(mask)

    npy = predict_files(tiny_checkpoint, [images], tmp_path / "npy", progress=False,
                        engine="torch", tta="flips", save_probabilities="npy", keep_largest=True)
    assert npy.post.transforms == ("identity", "hflip", "vflip", "hvflip")
    for mask_path in sorted((tmp_path / "npy" / "masks").iterdir()):
        prob = np.load(tmp_path / "npy" / "probabilities" / f"{mask_path.stem}.npy")
        mask = np.asarray(Image.open(mask_path)) > 0
        assert prob.dtype == np.float32 and prob.shape == mask.shape
        assert count_lesions(mask) <= 1
        assert (mask == clean_mask(prob > 0.5, largest=True)).all()


def test_predict_cli_names_the_post_processing(tiny_checkpoint, kvasir_mini, tmp_path, capsys):
    images = _copy_images(kvasir_mini, tmp_path / "in", 2)
    code = main(["predict", str(tiny_checkpoint), str(images), "--out", str(tmp_path / "o"),
                 "--backend", "torch", "--precision", "fp32", "--tta", "hflip",
                 "--min-lesion-pixels", "10", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0
    assert "test-time augmentation: identity, hflip" in err and "lesions under 10 pixels" in err
    assert main(["predict", str(tiny_checkpoint), str(images), "--out", str(tmp_path / "o2"),
                 "--backend", "torch", "--min-lesion-pixels", "-1", "--quiet"]) == 2
    assert "0 pixels or more" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()  # a refused command writes nothing


def _run_with_split(tiny_checkpoint, kvasir_mini, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)
    names = sorted(p.stem for p in (kvasir_mini / "images").glob("*.jpg"))
    split = {"kind": "holdout", "train": names[:6], "val": names[6:8], "test": names[8:]}
    (run / "split.json").write_text(json.dumps(split))
    return run, names


def test_evaluate_all_names_the_overlap_with_training(tiny_checkpoint, kvasir_mini, tmp_path, caplog):
    run, names = _run_with_split(tiny_checkpoint, kvasir_mini, tmp_path)
    with caplog.at_level(logging.WARNING, logger="lmnet"):
        result, out = evaluate_run(run, kvasir_mini, split="all", progress=False)
    assert "8 of the 12 images scored were used to make this model" in caplog.text
    assert "6 in its training split, 2 in its validation split" in caplog.text
    groups = result["groups"]
    assert groups["held out"]["n_images"] == len(names) - 8
    assert groups["in the model's train split"]["n_images"] == 6
    assert groups["in the model's val split"]["n_images"] == 2
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["seen_in_training"] == {"train": 6, "val": 2, "held_out": 4, "matched_by": "image name"}
    assert "| held out | 4 |" in (out / "metrics.md").read_text()
    # Its own test split: nothing to warn about.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmnet"):
        result, _ = evaluate_run(run, kvasir_mini, split="test", progress=False)
    assert "used to make" not in caplog.text and "held out" not in result["groups"]


def test_evaluate_tta_is_named_in_the_report(tiny_checkpoint, kvasir_mini, tmp_path):
    run, _ = _run_with_split(tiny_checkpoint, kvasir_mini, tmp_path)
    _, out = evaluate_run(run, kvasir_mini, split="test", progress=False,
                          post=PostProcess(tta="flips", largest=True))
    assert out.name == "eval_test_resized_tta-flips_largest"
    info = json.loads((out / "evaluated_on.json").read_text())
    assert info["tta"] == ["identity", "hflip", "vflip", "hvflip"] and info["keep_largest"] is True
    plain, _ = evaluate_run(run, kvasir_mini, split="test", progress=False)
    assert plain["all"]["n_images"] == 4
