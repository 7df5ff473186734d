"""Images read as a viewer shows them, whatever their colour mode or bit depth: real sample images
converted by the test give the same pixels and the same masks as the originals (issue 27)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lmnet.data.io import read_image, significant_bits
from tests.conftest import ROOT

SAMPLE = sorted((ROOT / "src" / "lmnet" / "sample_data" / "kvasir_sample" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(SAMPLE[30]) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def shipped():
    import lmnet

    return lmnet.from_pretrained("kvasir")


def _mask(model, image: np.ndarray) -> np.ndarray:
    from lmnet.deploy import preprocess
    from lmnet.deploy.postprocess import predict_probabilities, probabilities_to_mask
    from lmnet.deploy.pretrained import pretrained_train_config

    cfg = pretrained_train_config(model)
    x = preprocess([image], cfg.image_size, cfg.mean, cfg.std)
    return probabilities_to_mask(predict_probabilities(model, x, image.shape[:2]))[0]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("CMYK", "TIFF"), ("LAB", "TIFF"),
                                      ("YCbCr", "JPEG")])
def test_colour_modes_are_read_as_rgb(photo, shipped, tmp_path, mode, fmt):
    rgb_path = tmp_path / "rgb.png"
    photo.save(rgb_path)
    path = tmp_path / f"converted.{fmt.lower()}"
    photo.convert(mode).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    with Image.open(path) as im:
        assert im.mode == mode or (mode == "YCbCr" and im.mode == "RGB")
    reference, converted = read_image(rgb_path), read_image(path)
    assert converted.shape == reference.shape
    assert np.abs(converted.astype(int) - reference.astype(int)).mean() < 3.0
    assert _dice(_mask(shipped, converted), _mask(shipped, reference)) >= 0.98


def test_a_cmyk_jpeg_is_not_read_as_its_ink_channels(photo, tmp_path):
    path = tmp_path / "cmyk.jpg"
    photo.convert("CMYK").save(path, quality=95)
    inks = np.asarray(Image.open(path))[..., :3]  # what reading C, M, Y as R, G, B would give
    rgb = read_image(path)
    assert np.abs(rgb.astype(int) - np.asarray(photo).astype(int)).mean() < 3.0
    assert np.abs(inks.astype(int) - np.asarray(photo).astype(int)).mean() > 50


def test_12_bit_data_in_16_bit_files_reads_as_its_8_bit_version(photo, shipped, tmp_path, caplog):
    grey = np.asarray(photo.convert("L"))
    twelve = ((grey.astype(np.uint32) * 4095 + 127) // 255).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(twelve).save(tmp_path / "grey12.png")           # a 16-bit PNG (I;16)
    Image.fromarray(twelve.astype(np.int32)).save(tmp_path / "grey12.tif")  # an int32 TIFF
    assert significant_bits(twelve) == 12
    reference = read_image(tmp_path / "grey8.png")
    with caplog.at_level("WARNING", logger="lmnet"):
        for name in ("grey12.png", "grey12.tif"):
            image = read_image(tmp_path / name)
            assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1
            assert _dice(_mask(shipped, image), _mask(shipped, reference)) >= 0.995
    assert "holding 12-bit data" in caplog.text


def test_full_16_bit_data_keeps_its_scale():
    full = np.array([[0, 65535]], np.uint16)
    assert significant_bits(full) == 16
    from lmnet.data.io import to_uint8_channels

    assert to_uint8_channels(full, 1)[..., 0].tolist() == [[0, 255]]


def test_an_image_over_the_pixel_limit_is_one_line(tmp_path, monkeypatch, capsys):
    from lmnet.cli.main import main

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(10):
        Image.fromarray(np.zeros((120, 120, 3), np.uint8)).save(tmp_path / "images" / f"big{i}.png")
        Image.fromarray(np.zeros((120, 120), np.uint8)).save(tmp_path / "masks" / f"big{i}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 14400 pixels: a decompression bomb
    assert main(["check-data", str(tmp_path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "problems: 10" in out and "decompression bomb" in out.lower()
    assert main(["train", "--data", str(tmp_path), "--epochs", "1", "--image-size", "32",
                 "--out", str(tmp_path / "runs"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "decompression bomb" in err
    assert not (tmp_path / "runs").exists()
