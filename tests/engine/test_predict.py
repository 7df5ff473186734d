"""``lmnet predict`` never loses or invents an output: unique names, skipped masks and output folder.
(PyTorch engine: the engine choice is tested in ``test_loading.py``.)"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from lmnet.cli.main import main
from lmnet.engine.predict import collect_inputs, output_names, overlay


def _image(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 48, 3), value, np.uint8)).save(path)
    return path


def test_output_names_are_unique_and_stable(tmp_path):
    files = [tmp_path / "a" / "dup.jpg", tmp_path / "a" / "dup.png", tmp_path / "a" / "dup.bmp",
             tmp_path / "a" / "solo.png", tmp_path / "b" / "solo.png", tmp_path / "a" / "x.png"]
    names = output_names(files)
    assert len(set(names)) == len(names)
    assert names[:3] == ["dup_jpg", "dup_png", "dup_bmp"] and names[-1] == "x"
    assert names[3:5] == ["a_solo", "b_solo"]
    assert output_names(files[::-1]) == names[::-1]  # the order of the inputs does not matter


def test_predict_keeps_every_input_and_its_row(tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "in"
    for i, ext in enumerate(("jpg", "png", "bmp")):
        _image(src / f"dup.{ext}", 40 * i)
    _image(src / "other.png", 200)
    out = tmp_path / "out"
    assert main(["predict", str(tiny_checkpoint), str(src), "--backend", "torch", "--out", str(out), "--quiet"]) == 0
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert masks == ["dup_bmp.png", "dup_jpg.png", "dup_png.png", "other.png"]
    rows = list(csv.DictReader((out / "areas.csv").open()))
    assert len(rows) == 4
    for r in rows:  # every row names its own input and its own mask
        assert Path(r["mask"]).stem == output_names([Path(x["file"]) for x in rows])[rows.index(r)]
        assert Path(r["mask"]).is_file()


def test_an_output_folder_inside_the_input_is_not_predicted_again(tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "in"
    _image(src / "a.png", 100)
    _image(src / "b.png", 150)
    out = src / "pred"
    for again in ([], ["--overwrite"]):
        assert main(["predict", str(tiny_checkpoint), str(src), "--backend", "torch", "--out",
                     str(out), "--quiet", *again]) == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a.png", "b.png"]
    assert len(list(csv.DictReader((out / "areas.csv").open()))) == 2
    assert "skipped 4 file(s) in the output folder" in capsys.readouterr().err


def test_ground_truth_masks_are_skipped(tiny_checkpoint, tmp_path, capsys):
    busi = tmp_path / "benign"  # BUSI as downloaded: images beside NAME_mask.png, NAME_mask_1.png
    _image(busi / "benign (1).png", 90)
    _image(busi / "benign (1)_mask.png", 255)
    _image(busi / "benign (1)_mask_1.png", 255)
    _image(busi / "benign (2).png", 120)
    out = tmp_path / "out"
    assert main(["predict", str(tiny_checkpoint), str(busi), "--backend", "torch", "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["benign (1).png", "benign (2).png"]
    assert "skipped 2 file(s) in the mask files" in capsys.readouterr().err
    # images/ + masks/ folder pairs: the masks folder is skipped too
    pair = tmp_path / "pair"
    _image(pair / "images" / "c1.png", 30)
    _image(pair / "masks" / "c1.png", 255)
    skipped: dict = {}
    assert [p.name for p in collect_inputs([pair], skipped=skipped)] == ["c1.png"]
    assert [p.parent.name for p in skipped["mask files"]] == ["masks"]
    # a mask named on its own is the user's choice: kept
    assert collect_inputs([busi / "benign (1)_mask.png"]) == [busi / "benign (1)_mask.png"]


def test_only_masks_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    _image(tmp_path / "m" / "x_mask.png", 255)
    assert main(["predict", str(tiny_checkpoint), str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no image files" in err and "1 mask files skipped" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # a failed command changes nothing


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (37, 53), (64, 64)])
def test_overlay_matches_its_definition(shape):
    """The overlay: lesion pixels blended with red (alpha 0.45, float32, clipped), and those within
    2 pixels of the background or the image's edge (two erosions by the 3 x 3 cross) yellow."""
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    for mask in (rng.random(shape) > 0.3, np.ones(shape, bool), np.zeros(shape, bool)):
        expected = image.astype(np.float32)
        expected[mask] = 0.55 * expected[mask] + 0.45 * np.array([255, 0, 0], np.float32)
        expected[mask & ~ndimage.binary_erosion(mask, iterations=2)] = (255, 255, 0)
        np.testing.assert_array_equal(overlay(image, mask), expected.clip(0, 255).astype(np.uint8))
    gray, mask = image[..., :1], rng.random(shape) > 0.5
    np.testing.assert_array_equal(overlay(gray, mask), overlay(np.repeat(gray, 3, axis=2), mask))
