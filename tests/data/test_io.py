"""Reading masks of every format found in the real datasets, and synthetic edge cases."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lmnet.data import binarize_mask, list_images, read_array, read_mask
from lmnet.data.io import mask_findings, read_image


def test_kvasir_jpeg_mask_is_thresholded(kvasir_mini):
    path = sorted((kvasir_mini / "masks").glob("*.jpg"))[0]
    raw = read_array(path)
    assert raw.dtype == np.uint8 and len(np.unique(raw)) > 2  # JPEG: not exactly binary
    mask = read_mask(path)
    assert mask.dtype == bool and mask.shape == raw.shape[:2]
    gray = raw.max(axis=2) if raw.ndim == 3 else raw
    np.testing.assert_array_equal(mask, gray >= 128)
    assert 0 < mask.mean() < 1


def test_busi_masks_of_every_mode(busi_mini):
    one_bit_path = busi_mini / "benign" / "benign (1)_mask.png"
    assert Image.open(one_bit_path).mode == "1"
    one_bit = read_mask(one_bit_path)
    assert one_bit.any() and not one_bit.all()
    rgba_path = busi_mini / "benign" / "benign (2)_mask_1.png"
    assert Image.open(rgba_path).mode == "RGBA"
    rgba = read_mask(rgba_path)
    assert 0 < rgba.mean() < 0.2  # the alpha channel (all 255) is ignored
    normal_path = busi_mini / "normal" / "normal (2)_mask.png"
    assert Image.open(normal_path).mode == "RGB"
    assert not read_mask(normal_path).any()


def test_lgg_tiff_mask(lgg_mini):
    path = sorted((lgg_mini / "kaggle_3m").glob("*/*_1_mask.tif"))[0]
    mask = read_mask(path)
    assert mask.shape == (64, 64) and mask.dtype == bool and mask.any()


def test_exif_orientation_is_applied_to_images_and_masks(tmp_path):
    """A camera JPEG stored landscape with "rotate 90" in EXIF: read upright, as viewers show it."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a bright band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "img.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(stored).save(tmp_path / "mask.png", exif=exif.tobytes())
    image, mask = read_image(tmp_path / "img.jpg"), read_mask(tmp_path / "mask.png")
    assert image.shape == (40, 20, 3) and mask.shape == (40, 20)  # upright: taller than wide
    assert mask[:10].all() and not mask[10:].any()  # the left band is now the top band
    assert image[:10].mean() > 200 and image[12:].mean() < 50


def test_sixteen_bit_mask_storing_0_255_is_read_as_drawn(tmp_path):
    m = np.zeros((8, 8), np.uint16)
    m[2:5, 3:6] = 255
    Image.fromarray(m).save(tmp_path / "m16.png")
    assert read_array(tmp_path / "m16.png").dtype.itemsize == 2
    assert read_mask(tmp_path / "m16.png").sum() == 9
    assert mask_findings(read_array(tmp_path / "m16.png")) == []


def test_rgba_mask_drawn_in_alpha(tmp_path):
    """White everywhere, the lesion only in the alpha channel: the alpha is the mask."""
    rgba = np.full((10, 12, 4), 255, np.uint8)
    rgba[..., 3] = 0
    rgba[3:6, 4:9, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert read_mask(tmp_path / "alpha.png").sum() == 15
    opaque = rgba.copy()
    opaque[..., 3] = 255
    opaque[..., :3] = 0
    opaque[1:3, 1:3, :3] = 255  # an ordinary RGBA mask: colour decides, opaque alpha ignored
    assert read_mask_from(opaque, tmp_path).sum() == 4


def read_mask_from(arr, tmp_path):
    Image.fromarray(arr, "RGBA").save(tmp_path / "x.png")
    return read_mask(tmp_path / "x.png")


@pytest.mark.parametrize("arr,finding", [
    (np.array([[0, 1], [2, 2]], np.uint8), "empty after thresholding"),  # a 0/1/2 label map
    (np.full((4, 4), 255, np.uint8), "lesion everywhere"),
    (np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1)), "neither background nor lesion"),
])
def test_mask_findings_flag_suspicious_masks(arr, finding):
    assert any(finding in f for f in mask_findings(arr))


def test_check_data_reports_suspicious_masks(tmp_path, capsys):
    from lmnet.cli.main import main

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    labels = np.zeros((16, 16), np.uint8)
    labels[2:6, 2:6], labels[9:12, 9:12] = 1, 2  # a label map: classes 1 and 2
    for name, mask in (("ok", np.pad(np.full((4, 4), 255, np.uint8), 6)), ("labels", labels),
                       ("full", np.full((16, 16), 255, np.uint8))):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / f"{name}.png")
        Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
    assert main(["check-data", str(tmp_path), "--quiet"]) == 1  # suspicious masks fail the check
    captured = capsys.readouterr()
    out = captured.out
    assert "suspicious masks: 2" in out and "full.png: lesion everywhere" in out
    assert "labels.png: a label map with values 0, 1, 2" in out
    assert "labels.png" in out and "non-zero values (max 2) but empty after thresholding" in out
    assert "ok.png" not in out
    assert "--allow-suspicious" in captured.err
    assert main(["check-data", str(tmp_path), "--quiet", "--allow-suspicious"]) == 0


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


def _reference_binarize(arr):
    """The mask rules written the plain way (numpy's max over the channel axis, np.unique):
    what :func:`binarize_mask` computed before its faster formulation."""
    a = np.asarray(arr)
    if a.ndim == 3:
        c = a.shape[2]
        colour, alpha = (a[..., :c - 1], a[..., -1]) if c in (2, 4) else (a, None)
        colour = colour.max(axis=2)
        a = alpha if alpha is not None and colour.min() == colour.max() \
            and alpha.min() != alpha.max() else colour
    values = np.unique(a)
    if a.dtype == bool:
        return a
    if np.isin(values, (0, 1)).all():
        return a.astype(bool)
    if len(values) <= 2 and values[0] == 0:
        return a > 0
    if len(values) == 1:
        values = np.array([0, values[0]])
    if np.issubdtype(a.dtype, np.integer):
        return a >= ((255 if values[-1] <= 255 else np.iinfo(a.dtype).max) + 1) / 2
    return a >= (0.5 if float(values[-1]) <= 1.0 else 127.5)


def test_mask_rules_equal_their_plain_formulation_on_every_kind_of_mask(tmp_path):
    """The brightest channel taken plane by plane and the values counted (8 and 16 bits) give the
    masks of the plain formulation, for colour, alpha, grey, 16-bit, float, 0/1, label-map and
    constant masks; read from files, the label maps are still reported."""
    from lmnet.data.io import label_map_values

    rng = np.random.default_rng(0)
    soft = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    alpha_only = np.zeros((9, 8, 4), np.uint8)
    alpha_only[..., :3] = 40
    alpha_only[2:5, 3:6, 3] = 255
    cases = {
        "rgb jpeg-like": soft, "rgba": rng.integers(0, 256, (7, 5, 4), dtype=np.uint8),
        "alpha drawn": alpha_only, "grey+alpha": rng.integers(0, 256, (6, 6, 2), dtype=np.uint8),
        "grey": soft[..., 0], "16-bit": rng.integers(0, 65536, (9, 9), dtype=np.uint16),
        "16-bit 0/255": (rng.random((9, 9)) > 0.5).astype(np.uint16) * 255,
        "0/1": (rng.random((5, 7)) > 0.5).astype(np.uint8), "all 1": np.ones((4, 4), np.uint8),
        "label map": rng.integers(0, 3, (8, 8), dtype=np.uint8), "constant 90": np.full((3, 3), 90, np.uint8),
        "float": rng.random((6, 5)).astype(np.float32), "float 0-255": rng.random((6, 5)) * 255,
        "bool": rng.random((4, 6)) > 0.5, "int32": rng.integers(0, 300, (5, 5), dtype=np.int32),
    }
    for name, arr in cases.items():
        np.testing.assert_array_equal(binarize_mask(arr), _reference_binarize(arr), err_msg=name)
    assert label_map_values(cases["label map"]) == [0, 1, 2]
    assert label_map_values(cases["16-bit"]) is None and label_map_values(cases["0/1"]) is None
    for name in ("rgb jpeg-like", "label map", "16-bit 0/255"):
        path = tmp_path / f"{name.replace(' ', '_').replace('/', '_')}.png"
        Image.fromarray(cases[name]).save(path)
        found: list = []
        np.testing.assert_array_equal(read_mask(path, found), _reference_binarize(read_array(path)))
        assert bool(found) == (name == "label map"), name
