"""Every registered model through the same checks (after smp's shared model tester)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import lmnet
from lmnet.models import get_model_entry, list_models
from lmnet.models._size import count_parameters
from tests.conftest import randomize_batchnorm

ALL = list_models()


def test_registry_has_every_ablation_and_baseline():
    for name in ["lmnet", "lmnet_bridge_none", "lmnet_bridge_aspp", "lmnet_bridge_single",
                 "lmnet_skip_single", "lmnet_skip_single_lft", "lmnet_skip_multi", "lmnet_t10_mb",
                 "unet", "basic_unet", "unet_plusplus", "attention_unet", "swin_unetr", "dynunet"]:
        assert name in ALL
    assert {get_model_entry(n).table for n in list_models("lmnet_mb_*")} == {"6"}


def test_unet_baseline_has_about_31m_parameters():
    assert 30e6 < count_parameters(lmnet.create_model("unet")) < 32e6


#: Parameters a model has but never uses: MONAI's BasicUNetPlusPlus builds the heads of its deep
#: supervision even when it is off (their weights are counted in its parameters, never trained).
UNUSED = {"unet_plusplus": {f"model.final_conv_0_{i}.{w}" for i in (1, 2, 3) for w in ("weight", "bias")}}


@pytest.mark.parametrize("name", ALL)
def test_model_contract(name):
    """The shared model tester: shape, every parameter gets a gradient, eval determinism, a side
    that does not fit either works (the right output shape) or is a clear ValueError, and the
    deployed (re-parameterised) model gives the training form's eval logits. The export check is
    :func:`test_model_exports_to_onnx` (the same models, in its own test so its slow part can be
    marked)."""
    torch.manual_seed(0)
    model = lmnet.create_model(name, in_channels=1, n_classes=3)
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    assert out.shape == (2, 3, 64, 64)
    (out.float() * torch.randn_like(out.float())).sum().backward()
    no_grad = {n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)}
    assert no_grad == UNUSED.get(name, set())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        try:
            odd = model(torch.randn(1, 1, 72, 72))
        except ValueError as err:
            assert "72" in str(err), err  # names the size it refused
        else:
            assert odd.shape == (1, 3, 72, 72)
        # Re-parameterisation is exact for every registered model (LM-Net's branches and BNs
        # folded; a model without ``reparameterize`` is only put in eval mode), with trained-like
        # BatchNorm statistics so that the folding is not the identity.
        randomize_batchnorm(model)
        ref = model(x)
        out = lmnet.deploy(copy.deepcopy(model))(x)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), name


#: The smallest square side each model's export is checked at: 32, except where the bottleneck
#: would be 1 x 1 and InstanceNorm (MONAI's SwinUNETR and DynUNet) refuses a single pixel.
EXPORT_SIDE = {"swin_unetr": 64, "dynunet": 64}
#: ONNX-exported in the fast run: one model of each class and family (LM-Net in full, LM-Net with
#: single-path skips, the MONAI baselines); the other LM-Net variants (ablations of the same
#: class, about 2 s of export each on one core) run with the slow tests.
FAST_EXPORT = {"lmnet", "lmnet_t10_mb", "lmnet_skip_single", "unet", "basic_unet", "unet_plusplus",
               "attention_unet", "swin_unetr", "dynunet"}


def _deployed(name):
    return lmnet.deploy(lmnet.create_model(name, in_channels=3, n_classes=2))


def _same_deployed_network() -> dict[str, str]:
    """Models whose deployed network is another registered model's, module for module (the same
    ``repr``: types, shapes, strides, dilations) and tensor for tensor (names and shapes): Table
    6's branch sets fold to one depthwise convolution of their largest kernel. name -> the first
    such model, whose export check stands for both."""
    first: dict[str, str] = {}
    same: dict[str, str] = {}
    for name in ALL:
        m = _deployed(name)
        key = repr(m) + repr([(k, tuple(v.shape)) for k, v in m.state_dict().items()])
        if key in first:
            same[name] = first[key]
        else:
            first[key] = name
    return same


SAME_DEPLOYED = _same_deployed_network()


def test_models_sharing_a_deployed_network_are_the_branch_sets_that_fold_alike():
    assert SAME_DEPLOYED == {"lmnet_mb_5x5": "lmnet", "lmnet_mb_3x3_5x5": "lmnet",
                             "lmnet_mb_5x5_3x3_3x1_1x3_7x7": "lmnet_mb_7x7",
                             "lmnet_mb_5x5_3x3_3x1_1x3_5x5d2": "lmnet_mb_5x5d2"}


@pytest.mark.parametrize("name", [n if n in FAST_EXPORT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ALL if n not in SAME_DEPLOYED])
def test_model_exports_to_onnx(name, tmp_path):
    """Every registered model, deployed (:func:`lmnet.deploy`) and in eval mode, exported the way
    ``lmnet export`` does (:func:`lmnet.deploy.convert.export_onnx`: batch and size dynamic,
    traced at batch 2) and run by ONNX Runtime (:func:`lmnet.deploy.backends.load_exported`),
    gives PyTorch's logits at batch 1, to 1e-4 of the logits' scale. Every registered model
    exports to ONNX, so none needs the TorchScript fallback; a model whose deployed network is
    another's (:data:`SAME_DEPLOYED`) is checked through that one."""
    pytest.importorskip("onnxruntime")
    from lmnet.deploy.backends import load_exported
    from lmnet.deploy.convert import export_onnx

    torch.manual_seed(0)
    model = lmnet.deploy(randomize_batchnorm(lmnet.create_model(name, in_channels=3, n_classes=2)))
    assert not model.training
    side = EXPORT_SIDE.get(name, 32)
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        ref = model(x).numpy()
    path = export_onnx(model, tmp_path / f"{name}.onnx", in_channels=3, size=side)
    out = load_exported(path, "onnx", threads=1)(x.numpy())
    assert out.shape == ref.shape == (1, 2, side, side)
    scale = float(np.abs(ref).max())
    assert scale > 0
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * scale, err_msg=name)


def test_ablation_switches_change_the_structure():
    base = lmnet.create_model("lmnet")
    assert lmnet.create_model("lmnet_bridge_none").bridge is None
    assert lmnet.create_model("lmnet_skip_single").skips is None
    assert lmnet.create_model("lmnet_skip_single").lfts is None
    assert len(lmnet.create_model("lmnet_skip_single_lft").lfts) == len(base.lfts) == 4
    mb = lmnet.create_model("lmnet", branches=("3x3", "1x3"))
    assert len(mb.stage1[0].branches) == 2 and len(base.stage1[0].branches) == 4


def test_baselines_reject_lmnet_options():
    with pytest.raises(ValueError, match="takes only in_channels and n_classes"):
        lmnet.create_model("unet", width=24)
