"""Every registered model through the same checks (after smp's shared model tester)."""
from __future__ import annotations

import pytest
import torch

import lmnet
from lmnet.models import get_model_entry, list_models
from lmnet.models._size import count_parameters

ALL = list_models()


def test_registry_has_every_ablation_and_baseline():
    for name in ["lmnet", "lmnet_bridge_none", "lmnet_bridge_aspp", "lmnet_bridge_single",
                 "lmnet_skip_single", "lmnet_skip_single_lft", "lmnet_skip_multi", "lmnet_t10_mb",
                 "unet", "basic_unet", "unet_plusplus", "attention_unet", "swin_unetr", "dynunet"]:
        assert name in ALL
    assert {get_model_entry(n).table for n in list_models("lmnet_mb_*")} == {"6"}


def test_unet_baseline_has_about_31m_parameters():
    assert 30e6 < count_parameters(lmnet.create_model("unet")) < 32e6


@pytest.mark.parametrize("name", ALL)
def test_model_contract(name):
    model = lmnet.create_model(name, in_channels=1, n_classes=3)
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    assert out.shape == (2, 3, 64, 64)
    out.float().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


def test_ablation_switches_change_the_structure():
    base = lmnet.create_model("lmnet")
    assert lmnet.create_model("lmnet_bridge_none").bridge is None
    assert lmnet.create_model("lmnet_skip_single").skips is None
    assert lmnet.create_model("lmnet_skip_single").lfts is None
    assert lmnet.create_model("lmnet_skip_single_lft").lfts is not None
    mb = lmnet.create_model("lmnet", branches=("3x3", "1x3"))
    assert len(mb.stage1[0].branches) == 2 and len(base.stage1[0].branches) == 4


def test_baselines_reject_lmnet_options():
    with pytest.raises(ValueError, match="takes only in_channels and n_classes"):
        lmnet.create_model("unet", width=24)
