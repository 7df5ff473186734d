"""Reading masks of every format found in the real datasets, and synthetic edge cases."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lmnet.data import binarize_mask, list_images, read_array, read_mask
from tests.conftest import SHARED_DATASETS

KVASIR = SHARED_DATASETS / "kvasir-seg"
BUSI = SHARED_DATASETS / "busi"
LGG = SHARED_DATASETS / "lgg" / "kaggle_3m"


def test_kvasir_jpeg_mask_is_thresholded():
    path = sorted((KVASIR / "masks").glob("*.jpg"))[0]
    raw = read_array(path)
    assert raw.dtype == np.uint8 and len(np.unique(raw)) > 2  # JPEG: not exactly binary
    mask = read_mask(path)
    assert mask.dtype == bool and mask.shape == raw.shape[:2]
    gray = raw.max(axis=2) if raw.ndim == 3 else raw
    np.testing.assert_array_equal(mask, gray >= 128)
    assert 0 < mask.mean() < 1


def test_busi_masks_of_every_mode():
    one_bit = read_mask(BUSI / "benign" / "benign (1)_mask.png")
    assert Image.open(BUSI / "benign" / "benign (1)_mask.png").mode == "1"
    assert one_bit.any() and not one_bit.all()
    rgba_path = BUSI / "benign" / "benign (4)_mask_1.png"
    assert Image.open(rgba_path).mode == "RGBA"
    rgba = read_mask(rgba_path)
    assert 0 < rgba.mean() < 0.1  # the alpha channel (all 255) is ignored
    normal_path = BUSI / "normal" / "normal (1)_mask.png"
    assert Image.open(normal_path).mode == "RGB"
    assert not read_mask(normal_path).any()


def test_lgg_tiff_mask():
    path = sorted(LGG.glob("*/*_mask.tif"))[0]
    mask = read_mask(path)
    assert mask.shape == (256, 256) and mask.dtype == bool


def test_zero_one_and_sixteen_bit_masks(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 2:5] = 1
    Image.fromarray(m).save(tmp_path / "zero_one.png")
    assert read_mask(tmp_path / "zero_one.png").sum() == 6
    m16 = (m.astype(np.uint16) * 65535)
    Image.fromarray(m16).save(tmp_path / "sixteen.png")
    assert read_mask(tmp_path / "sixteen.png").sum() == 6
    soft = np.array([[0, 100, 127, 128, 200, 255]], np.uint8)
    assert binarize_mask(soft).tolist() == [[False, False, False, True, True, True]]


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        read_mask(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_mask(tmp_path / "missing.png")


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nope")
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["a.png"]
