"""Export to ONNX / TorchScript and prediction through ONNX Runtime, on real Kvasir-SEG images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmnet.cli.main import main
from lmnet.config import TrainConfig
from lmnet.data.io import read_image
from lmnet.deploy import preprocess
from lmnet.deploy.backends import load_exported
from lmnet.deploy.checkpoint import model_from_checkpoint
from lmnet.deploy.export import export_checkpoint
from lmnet.deploy.metadata import exported_config
from lmnet.deploy.postprocess import predict_probabilities, probabilities_to_mask
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
    assert exported_config(path).image_size == 64
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
    # fp32: on a CPU with bf16 in hardware, --precision auto may take PyTorch's bf16
    assert main(["predict", str(kvasir_run), str(inputs), "--backend", "torch", "--precision",
                 "fp32", "--out", str(tmp_path / "t"), "--quiet"]) == 0
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
    assert main(["predict", str(tmp_path / "m.onnx"), str(inputs), "--backend", "onnx", "--out",
                 str(tmp_path / "o"), "--quiet"]) == 0
    differ = _pixels_differing(tmp_path / "t", tmp_path / "o")
    assert differ <= 10, f"{differ} mask pixels differ"  # ties at 0.5 only (see above)
    # A checkpoint with --backend onnx is exported to a temporary file: nothing left behind.
    before = sorted(kvasir_run.iterdir())
    assert main(["predict", str(kvasir_run), str(inputs), "--backend", "onnx", "--out",
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
    assert main(["predict", str(tmp_path / "junk.onnx"), str(tmp_path / "imgs"), "--backend", "onnx",
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
    import openvino as ov

    from lmnet.deploy.backends import _ir_image_size  # the size the runner compiles the IR for
    assert _ir_image_size(ov.Core().read_model(str(tmp_path / "m.xml"))) == exported_config(
        tmp_path / "m.xml").image_size
    before = sorted(kvasir_run.iterdir())
    for name, model in (("ov", str(kvasir_run)), ("ir", str(tmp_path / "m.xml"))):
        assert main(["predict", model, str(inputs), "--backend", "openvino", "--precision",
                     "fp32", "--out", str(tmp_path / name), "--quiet"]) == 0
        differ = _pixels_differing(tmp_path / "t", tmp_path / name)
        assert differ <= 10, (name, differ)  # ties at 0.5 only
    assert sorted(kvasir_run.iterdir()) == before  # nothing written beside the run
    assert main(["predict", str(tmp_path / "m.xml"), str(inputs), "--backend", "torch", "--out",
                 str(tmp_path / "x")]) == 2
    assert "use --backend openvino" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "m.xml"), str(inputs), "--out", str(tmp_path / "x")]) == 0
    assert "engine: openvino (the file's own)" in capsys.readouterr().err  # auto: the file's engine
    assert main(["evaluate", str(kvasir_run), "--backend", "openvino", "--out", str(tmp_path / "ev"),
                 "--quiet"]) == 0
    assert main(["evaluate", str(kvasir_run), "--out", str(tmp_path / "et"), "--quiet"]) == 0
    import json

    a = json.loads((tmp_path / "ev" / "metrics.json").read_text())["all"]["fg_dice_mean"]
    b = json.loads((tmp_path / "et" / "metrics.json").read_text())["all"]["fg_dice_mean"]
    assert abs(a - b) < 1e-3


@pytest.mark.slow
def test_int8_openvino_keeps_the_validation_dice(kvasir_run, tmp_path, capsys):
    """NNCF int8, calibrated on training images, accuracy-controlled on the validation split: the
    IR is quantised, carries its split and provenance, and its validation Dice (what the control
    holds within 0.5 points) is within that of fp32's, measured by lmnet evaluate."""
    import json

    import openvino as ov

    path = tmp_path / "m_int8.xml"
    assert main(["export", str(kvasir_run), "--format", "openvino", "--int8",
                 "--calibration-images", "8", "--out", str(path)]) == 0
    assert "int8, calibrated on 8 training images" in capsys.readouterr().out
    ir = ov.Core().read_model(str(path))
    assert any(op.get_type_name() == "FakeQuantize" for op in ir.get_ops())
    meta = json.loads(ir.get_rt_info(["lmnet_int8"]).astype(str))
    assert meta["calibration_images"] == 8 and meta["accuracy_control"]["validation_images"] == 4
    assert meta["weight_bits"] == 7
    for model, out in ((str(path), "int8"), (str(kvasir_run), "fp32")):
        assert main(["evaluate", model, "--split", "val", "--out", str(tmp_path / out),
                     "--quiet"]) == 0  # the int8 IR: its own engine and its stored split
    dice = {k: json.loads((tmp_path / k / "metrics.json").read_text())["all"]["fg_dice_mean"]
            for k in ("int8", "fp32")}
    on = {k: json.loads((tmp_path / k / "evaluated_on.json").read_text()) for k in ("int8", "fp32")}
    assert on["int8"]["int8"]["weight_bits"] == 7 and "int8" not in on["fp32"]
    assert dice["int8"] >= dice["fp32"] - 0.005 - 1e-6, dice


def test_int8_weights_use_seven_bits_in_every_layer():
    """Without VNNI the CPU sums pairs of u8 x s8 products in 16 bits, which saturate with full
    8-bit weights: every weight quantiser of the int8 model keeps to the 7-bit range, not only
    the first layer's (NNCF's default)."""
    import openvino as ov

    from lmnet.deploy.quantize import WEIGHT_BITS, quantize_openvino

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 2, 1)).eval()
    fp32 = ov.convert_model(net, example_input=torch.randn(1, 3, 16, 16))
    rng = np.random.default_rng(0)
    q = quantize_openvino(fp32, [rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
                                 for _ in range(4)])
    # NNCF stores quantised weights as int8 constants (with their scales beside them)
    weights = [op.get_data() for op in q.get_ops() if op.get_type_name() == "Constant"
               and op.get_element_type() == ov.Type.i8]
    assert len(weights) == 3  # the three convolutions'
    assert all(np.abs(w.astype(int)).max() <= 2 ** (WEIGHT_BITS - 1) for w in weights), \
        [int(np.abs(w.astype(int)).max()) for w in weights]  # 8 bits would reach 127


def test_int8_calibrates_on_training_images_only(kvasir_mini):
    from lmnet.data.layouts import discover
    from lmnet.deploy.quantize import calibration_samples, validation_items

    names = [s.name for s in discover(kvasir_mini)[1]]
    split = {"train": names[:6], "val": names[6:8], "test": names[8:]}
    cfg = TrainConfig(data=str(kvasir_mini), image_size=32)
    chosen = calibration_samples(cfg, None, split, count=4)
    assert len(chosen) == 4 and {s.name for s in chosen} <= set(split["train"])
    assert len(calibration_samples(cfg, None, split, count=100)) == 6
    assert len(validation_items(cfg, None, split)) == 2
    with pytest.raises(ValueError, match="split is not known"):
        calibration_samples(cfg, None, None)


def test_int8_errors(tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert main(["export", str(tiny_checkpoint), "--int8", "--out", out]) == 2
    assert "use --format openvino" in capsys.readouterr().err
    assert main(["export", str(tiny_checkpoint), "--calibration-images", "5", "--out", out]) == 2
    assert "are for --int8" in capsys.readouterr().err
    assert main(["export", str(tiny_checkpoint), "--format", "openvino", "--int8", "--out",
                 str(tmp_path / "m.xml")]) == 2  # a checkpoint without split.json or data
    err = capsys.readouterr().err
    assert ("split is not known" in err or "no dataset" in err) and "Traceback" not in err
    assert not (tmp_path / "m.xml").exists()


def test_export_check_runs_sizes_the_model_accepts(tmp_path):
    """The check's second input (another size, batch 2) respects a network's side multiple: a
    DynUNet (H, W % 32) exports and checks, where a size 16 px off would be refused."""
    import lmnet
    from lmnet.deploy.export import export_model

    torch.manual_seed(0)
    model = lmnet.create_model("dynunet").eval()
    assert model.side_multiple == 32
    cfg = TrainConfig(model="dynunet", image_size=64)
    result = export_model(model, cfg, "onnx", tmp_path / "dynunet.onnx")
    assert result["check_shapes"] == [[1, 3, 64, 64], [2, 3, 128, 96]]
    assert result["max_abs_diff"] < 1e-3
