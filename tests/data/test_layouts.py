"""Dataset layouts: the real Kvasir-SEG, BUSI and LGG folders, a CVC-ClinicDB miniature, generic."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from lmnet.cli.main import main
from lmnet.data.dataset import load_sample
from lmnet.data.io import read_image
from lmnet.data.layouts import DatasetError, detect_format, discover
from tests.miniatures import BUSI_COUNTS, LGG_PATIENTS, LGG_SLICES, make_cvc


def test_kvasir(kvasir_mini):
    fmt, samples, problems = discover(kvasir_mini)
    assert fmt == "kvasir" and len(samples) == 12 and problems == []
    image, mask = load_sample(samples[0])
    assert image.shape[2] == 3 and mask.shape == image.shape[:2]
    assert set(np.unique(mask)) == {0, 1}


def test_busi_groups_and_mask_union(busi_mini):
    fmt, samples, problems = discover(busi_mini)
    assert fmt == "busi" and len(samples) == sum(BUSI_COUNTS.values()) and problems == []
    counts = {g: sum(s.group == g for s in samples) for g in ("benign", "malignant", "normal")}
    assert counts == BUSI_COUNTS
    multi = [s for s in samples if len(s.masks) > 1]
    assert len(multi) == 1
    s = multi[0]
    _, union = load_sample(s)
    from lmnet.data.io import read_mask

    parts = [read_mask(m) for m in s.masks]
    np.testing.assert_array_equal(union.astype(bool), np.logical_or.reduce(parts))
    assert union.sum() > max(p.sum() for p in parts)
    normal = next(x for x in samples if x.group == "normal")
    assert not load_sample(normal)[1].any()


def test_lgg_patients(lgg_mini):
    fmt, samples, problems = discover(lgg_mini)
    assert fmt == "lgg" and len(samples) == LGG_PATIENTS * LGG_SLICES and problems == []
    assert len({s.patient for s in samples}) == LGG_PATIENTS
    assert all(s.name.startswith(s.patient) for s in samples)


@pytest.fixture()
def cvc_miniature(tmp_path):
    return make_cvc(tmp_path / "CVC-ClinicDB")


def test_cvc_miniature(cvc_miniature):
    with pytest.raises(Exception):
        Image.open(cvc_miniature / "Original" / "1.tif").load()  # Pillow refuses these files
    fmt, samples, problems = discover(cvc_miniature)
    assert fmt == "cvc" and len(samples) == 3 and problems == []
    image, mask = load_sample(samples[0])
    assert image.shape == (72, 96, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, tifffile.imread(samples[0].image))
    assert mask.shape == (72, 96)
    soft = tifffile.imread(samples[0].masks[0])
    assert len(np.unique(soft)) == 3  # 0, 255 and in-between values on the edge
    np.testing.assert_array_equal(mask.astype(bool), soft >= 128)  # soft edge thresholded at 128


def test_generic_any_format(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(tmp_path / "images" / "b.bmp")
    m = np.zeros((40, 50), np.uint8)
    m[5:10, 5:10] = 1
    Image.fromarray(m).save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.full((30, 20), 255, np.uint8)).save(tmp_path / "masks" / "b.tif")
    fmt, samples, problems = discover(tmp_path)
    assert fmt == "generic" and [s.name for s in samples] == ["a", "b"] and problems == []
    assert load_sample(samples[0])[1].sum() == 25
    assert load_sample(samples[1])[1].all()
    gray = read_image(samples[1].image, 3)
    assert gray.shape == (30, 20, 3)


def test_unmatched_and_unknown_layouts(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "lonely.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "ok.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "ok.png")
    _, samples, problems = discover(tmp_path)
    assert len(samples) == 1 and "lonely.png" in problems[0]
    with pytest.raises(DatasetError, match="cannot tell the layout"):
        detect_format(tmp_path / "images")
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "nope")


def test_check_data_cli(lgg_mini, tmp_path, capsys):
    assert main(["check-data", str(lgg_mini), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"format lgg, {LGG_PATIENTS * LGG_SLICES} images" in out
    assert f"patients: {LGG_PATIENTS}" in out and "problems: 0" in out
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"broken")
    (tmp_path / "masks" / "x.png").write_bytes(b"broken")
    assert main(["check-data", str(tmp_path), "--quiet"]) == 1
    assert "x.png" in capsys.readouterr().out
    assert main(["check-data", str(tmp_path / "nope")]) == 2
