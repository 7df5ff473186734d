"""Export to ONNX / TorchScript and prediction through ONNX Runtime, on real Kvasir-SEG images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmnet.cli.main import main
from lmnet.config import TrainConfig
from lmnet.data.io import read_image
from lmnet.deploy import preprocess
from lmnet.deploy.checkpoint import model_from_checkpoint
from lmnet.deploy.engines import predict_probabilities, probabilities_to_mask
from lmnet.deploy.export import export_checkpoint, load_exported, onnx_config
from lmnet.engine.train import train
from tests.conftest import ROOT

SAMPLE = ROOT / "src" / "lmnet" / "sample_data" / "kvasir_sample"
KVASIR_IMAGES = sorted((SAMPLE / "images").glob("*.jpg"))[24:30]  # not among the training images

#: Stated tolerance: ONNX Runtime and PyTorch logits agree to 1e-4 absolute (fp32, different
#: kernels and summation orders).
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def kvasir_run(tmp_path_factory):
    """A short real run on 24 Kvasir-SEG images of the shipped sample at 64 x 64 (a trained,
    non-trivial checkpoint)."""
    from lmnet.data.layouts import discover
    from lmnet.data.splits import save_split

    out = tmp_path_factory.mktemp("kv")
    names = [s.name for s in discover(SAMPLE)[1][:24]]
    save_split({"train": names[:16], "val": names[16:20], "test": names[20:]}, out / "split.json")
    cfg = TrainConfig(data=str(SAMPLE), image_size=64, batch_size=8,
                      epochs=2, split_file=str(out / "split.json"), out=str(out), name="run")
    return train(cfg, progress=False)


@pytest.mark.slow
def test_onnx_matches_pytorch_on_real_images(kvasir_run, tmp_path):
    path = tmp_path / "model.onnx"
    result = export_checkpoint(kvasir_run, "onnx", path)
    assert result["max_abs_diff"] < LOGIT_ATOL
    import onnx

    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert onnx_config(path).image_size == 64
    model, cfg = model_from_checkpoint(kvasir_run)
    run = load_exported(path, "onnx")
    images = [read_image(p) for p in KVASIR_IMAGES]
    x = preprocess(images, cfg.image_size, cfg.mean, cfg.std)
    with torch.no_grad():
        ref = model(x).numpy()
    out = run(x.numpy())
    np.testing.assert_allclose(out, ref, atol=LOGIT_ATOL, rtol=0)
    masks_torch = probabilities_to_mask(predict_probabilities(model, x, images[0].shape[:2]))
    masks_onnx = probabilities_to_mask(predict_probabilities(run, x, images[0].shape[:2]))
    # Identical masks, except at ties: a pixel whose lesion probability is within fp32 rounding
    # (1e-6) of the 0.5 threshold may fall either way (one such pixel in ~2 million here).
    probs = predict_probabilities(model, x, images[0].shape[:2])
    differ = torch.from_numpy(masks_onnx != masks_torch)
    assert int(differ.sum()) <= 10
    assert bool(((probs - 0.5).abs()[differ] < 1e-6).all())
    # Dynamic spatial size: a batch at another size than the exported one.
    x2 = torch.randn(3, 3, 96, 128)
    with torch.no_grad():
        np.testing.assert_allclose(run(x2.numpy()), model(x2).numpy(), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.slow
def test_torchscript_export(kvasir_run, tmp_path):
    result = export_checkpoint(kvasir_run, "torchscript", tmp_path / "model.pt")
    assert result["max_abs_diff"] < LOGIT_ATOL


def _inputs_and_torch_masks(kvasir_run, tmp_path):
    """Three real images in ``tmp_path/in``, predicted by PyTorch into ``tmp_path/t``."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in KVASIR_IMAGES[:3]:
        (inputs / p.name).write_bytes(p.read_bytes())
    assert main(["predict", str(kvasir_run), str(inputs), "--out", str(tmp_path / "t"), "--quiet"]) == 0
    return inputs


def _pixels_differing(a_dir, b_dir):
    from PIL import Image

    return sum(int((np.asarray(Image.open(a_dir / "masks" / f"{p.stem}.png")) !=
                    np.asarray(Image.open(b_dir / "masks" / f"{p.stem}.png"))).sum())
               for p in KVASIR_IMAGES[:3])


@pytest.mark.slow
def test_predict_with_both_engines_gives_identical_masks(kvasir_run, tmp_path, capsys):
    inputs = _inputs_and_torch_masks(kvasir_run, tmp_path)
    assert main(["export", str(kvasir_run), "--out", str(tmp_path / "m.onnx")]) == 0
    assert "largest logit difference" in capsys.readouterr().out
    assert main(["predict", str(tmp_path / "m.onnx"), str(inputs), "--engine", "onnx", "--out",
                 str(tmp_path / "o"), "--quiet"]) == 0
    differ = _pixels_differing(tmp_path / "t", tmp_path / "o")
    assert differ <= 10, f"{differ} mask pixels differ"  # ties at 0.5 only (see above)
    # A checkpoint with --engine onnx is exported to a temporary file: nothing left behind.
    before = sorted(kvasir_run.iterdir())
    assert main(["predict", str(kvasir_run), str(inputs), "--engine", "onnx", "--out",
                 str(tmp_path / "c"), "--quiet"]) == 0
    assert sorted(kvasir_run.iterdir()) == before and not list(kvasir_run.glob("*.onnx"))
    assert len(list((tmp_path / "c" / "masks").iterdir())) == len(list(inputs.iterdir()))


def test_export_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["export", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / KVASIR_IMAGES[0].name).write_bytes(KVASIR_IMAGES[0].read_bytes())
    assert main(["predict", str(tmp_path / "junk.onnx"), str(tmp_path / "imgs"), "--engine", "onnx",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a readable" in err and "Traceback" not in err


@pytest.mark.slow
def test_openvino_matches_pytorch_on_real_images(kvasir_run, tmp_path, capsys):
    """OpenVINO, converted on the fly or from the exported IR: the same masks as PyTorch."""
    inputs = _inputs_and_torch_masks(kvasir_run, tmp_path)
    assert main(["export", str(kvasir_run), "--format", "openvino", "--out", str(tmp_path / "m.xml")]) == 0
    out = capsys.readouterr().out
    diff = float(out.split("to PyTorch on shapes")[1].split(":")[1])
    assert diff < LOGIT_ATOL, out
    before = sorted(kvasir_run.iterdir())
    for name, model in (("ov", str(kvasir_run)), ("ir", str(tmp_path / "m.xml"))):
        assert main(["predict", model, str(inputs), "--engine", "openvino", "--out",
                     str(tmp_path / name), "--quiet"]) == 0
        differ = _pixels_differing(tmp_path / "t", tmp_path / name)
        assert differ <= 10, (name, differ)  # ties at 0.5 only
    assert sorted(kvasir_run.iterdir()) == before  # nothing written beside the run
    assert main(["predict", str(tmp_path / "m.xml"), str(inputs), "--out", str(tmp_path / "x")]) == 2
    assert "use --engine openvino" in capsys.readouterr().err
    assert main(["evaluate", str(kvasir_run), "--engine", "openvino", "--out", str(tmp_path / "ev"),
                 "--quiet"]) == 0
    assert main(["evaluate", str(kvasir_run), "--out", str(tmp_path / "et"), "--quiet"]) == 0
    import json

    a = json.loads((tmp_path / "ev" / "metrics.json").read_text())["all"]["fg_dice_mean"]
    b = json.loads((tmp_path / "et" / "metrics.json").read_text())["all"]["fg_dice_mean"]
    assert abs(a - b) < 1e-3
