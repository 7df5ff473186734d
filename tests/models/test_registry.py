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


#: Parameters a model has but never uses: MONAI's BasicUNetPlusPlus builds the heads of its deep
#: supervision even when it is off (their weights are counted in its parameters, never trained).
UNUSED = {"unet_plusplus": {f"model.final_conv_0_{i}.{w}" for i in (1, 2, 3) for w in ("weight", "bias")}}


@pytest.mark.parametrize("name", ALL)
def test_model_contract(name):
    """The shared model tester: shape, every parameter gets a gradient, eval determinism, and a
    side that does not fit either works (the right output shape) or is a clear ValueError."""
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
