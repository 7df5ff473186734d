"""LM-Net: sizes from the spec, forward contract, configuration errors, re-parameterisation."""
from __future__ import annotations

import copy

import pytest
import torch

import lmnet
from lmnet.models import LMNet, LMNetConfig
from lmnet.models._size import count_macs, count_parameters, part_parameters
from tests.conftest import randomize_batchnorm

# The spec's table (3 input channels, 2 classes), counted on the authors' released model.
SPEC_PARTS = {
    "stage1": 4_248, "stage2": 13_176, "stage3": 42_480, "stage4": 149_472,
    "down1": 2_616, "down2": 10_416, "down3": 41_568, "down4": 166_080,
    "bridge": 2_428_608,
    "skips[0]": 290_784, "skips[1]": 135_072, "skips[2]": 33_840, "skips[3]": 6_540,
    "lfts[0]": 158_124, "lfts[1]": 40_044, "lfts[2]": 10_380, "lfts[3]": 2_892,
    "ups[0]": 165_984, "ups[1]": 41_520, "ups[2]": 10_392, "ups[3]": 2_604,
    "decoders[0]": 149_472, "decoders[1]": 42_480, "decoders[2]": 13_176, "decoders[3]": 4_572,
    "head": 26,
}


def test_default_model_has_the_spec_parameter_count():
    model = lmnet.create_model("lmnet")
    assert count_parameters(model) == 3_966_566
    assert part_parameters(model) == SPEC_PARTS


def test_without_position_bias_matches_the_spec_note():
    assert count_parameters(lmnet.create_model("lmnet", position_bias=False)) == 3_965_366


@pytest.mark.parametrize("in_channels,n_classes,width", [(3, 2, 12), (1, 1, 12), (4, 3, 24)])
def test_forward_shape(in_channels, n_classes, width):
    model = lmnet.create_model("lmnet", in_channels=in_channels, n_classes=n_classes, width=width)
    out = model(torch.randn(2, in_channels, 32, 48))
    assert out.shape == (2, n_classes, 32, 48)


def test_gradients_reach_every_parameter():
    model = lmnet.create_model("lmnet")
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


def test_wrong_channel_count_is_a_clear_error():
    model = lmnet.create_model("lmnet")
    with pytest.raises(ValueError, match=r"expected 3 input channels.*\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize("h,w", [(250, 256), (64, 70), (16, 64)])
def test_bad_spatial_size_names_the_expected_shape(h, w):
    model = lmnet.create_model("lmnet")
    with pytest.raises(ValueError, match=r"multiples of 16.*expected \(B, 3, H, W\), e\.g\. \d+x\d+"):
        model(torch.randn(1, 3, h, w))


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'lmnett'.*Known models: lmnet, "):
        lmnet.create_model("lmnett")


@pytest.mark.parametrize("kwargs,match", [
    ({"bridge": "gft"}, "bridge must be one of"), ({"skip": "dense"}, "skip must be one of"),
    ({"width": 0}, "width must be a positive integer"), ({"width": 16}, "multiple of num_heads"),
    ({"na_kernel": 4}, "odd"), ({"branches": ["2x2"]}, "odd"), ({"drop": 1.5}, "drop"),
    ({"depth": 3}, "unknown LM-Net option"),
])
def test_invalid_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lmnet.create_model("lmnet", **kwargs)


def test_config_round_trip():
    cfg = LMNetConfig(branches="3x3,5x5", bridge="aspp", n_classes=1)
    again = LMNetConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.branches == ("3x3", "5x5")
    assert LMNet(again).config == cfg


def _trained_bn_model(name: str = "lmnet", **kw) -> torch.nn.Module:
    model = randomize_batchnorm(lmnet.create_model(name, **kw))
    return model.eval()


@pytest.mark.parametrize("name", ["lmnet", "lmnet_mb_5x5_3x3_3x1_1x3_5x5d2", "lmnet_bridge_aspp",
                                  "lmnet_skip_single"])
def test_whole_model_reparameterization_is_exact(name):
    model = _trained_bn_model(name)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        deployed = lmnet.deploy(copy.deepcopy(model))
        out = deployed(x)
    assert deployed.deployed
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5, f"relative difference {rel:.2e}"


def test_reparameterization_after_training_steps():
    model = lmnet.create_model("lmnet")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(
            model(torch.randn(2, 3, 32, 32)), torch.randint(0, 2, (2, 32, 32)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        ref = model(x)
        out = lmnet.deploy(model)(x)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5


def test_deploy_is_idempotent_and_shrinks_the_model():
    model = lmnet.create_model("lmnet")
    before_params = count_parameters(model)
    before_macs = count_macs(model, 64)["total"]
    lmnet.deploy(model)
    sd = copy.deepcopy(model.state_dict())
    lmnet.deploy(model)
    assert model.state_dict().keys() == sd.keys()
    assert count_parameters(model) < before_params
    assert count_macs(model, 64)["total"] < before_macs
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_deployed_state_dict_loads_into_a_deployed_model(tmp_path):
    model = lmnet.deploy(_trained_bn_model())
    path = tmp_path / "deployed.pt"
    torch.save(model.state_dict(), path)
    fresh = lmnet.deploy(lmnet.create_model("lmnet"))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_macs_are_about_the_spec_figure():
    macs = count_macs(lmnet.create_model("lmnet"), 256)
    # The spec: about 5.2 G multiply-accumulates per 256 x 256 image in training form.
    assert 5.0e9 < macs["total"] < 5.4e9
    assert macs["neighborhood_attention"] > 0


def test_authors_initialisation():
    """GFT attention Linear: trunc-normal std 0.02, zero bias; SE convs: Kaiming normal (fan-in)."""
    from lmnet.layers.squeeze_excite import SqueezeExcite
    from lmnet.layers.transformer import MultiHeadSelfAttention

    torch.manual_seed(0)
    model = lmnet.create_model("lmnet")
    attn = [m for m in model.modules() if isinstance(m, MultiHeadSelfAttention)]
    assert len(attn) == 1
    for linear in (attn[0].qkv, attn[0].proj):
        w = linear.weight.detach()
        assert abs(float(w.std()) - 0.02) < 0.002 and float(w.abs().max()) <= 2.0
        assert float(linear.bias.abs().max()) == 0.0
    se = max((m for m in model.modules() if isinstance(m, SqueezeExcite)),
             key=lambda m: m.reduce.weight.numel())  # the largest: enough weights for a std
    for conv in (se.reduce, se.expand):
        fan_in = conv.weight[0].numel()
        expected = (2.0 / fan_in) ** 0.5  # Kaiming normal, ReLU gain
        assert abs(float(conv.weight.std()) - expected) / expected < 0.1
    # PyTorch's default (uniform, bound 1/sqrt(fan_in)) would give std 1/sqrt(3 fan_in): far off
    default = (3 * se.expand.weight[0].numel()) ** -0.5
    assert abs(float(se.expand.weight.std()) - default) / default > 0.5
