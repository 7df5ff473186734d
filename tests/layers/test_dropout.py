"""The hashed-mask dropout (issue 28): the native kernel gives the same bits as its PyTorch
formulation, keeps each element with probability 1 - p, applies the forward's mask to the
gradient, and stands aside (``F.dropout``) wherever it does not apply."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lmnet
from lmnet.layers import Dropout
from lmnet.layers import dropout as hashed
from lmnet.layers.fast_path import fast_path
from lmnet.layers.native import native_ops

pytestmark = pytest.mark.skipif(native_ops() is None, reason="native kernels not built here")


def _expected(x: torch.Tensor, k0: int, k1: int, p: float) -> torch.Tensor:
    threshold, scale = hashed.threshold_and_scale(p)
    keep = hashed.reference_mask(x.numel(), k0, k1, threshold).reshape(x.shape)
    return x * torch.where(keep, torch.tensor(scale), torch.tensor(0.0))


@pytest.mark.parametrize("shape", [(2, 17, 19, 12), (1, 7), (3, 5, 1), (0, 4)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_kernel_equals_its_pytorch_formulation(shape, p):
    torch.manual_seed(0)
    x = torch.randn(shape)
    threshold, scale = hashed.threshold_and_scale(p)
    for k0, k1 in [(0, 0), (12345, 987654321), (2**32 - 1, 2**31)]:
        got = native_ops().dropout_apply(x, k0, k1, threshold, scale)
        assert torch.equal(got, _expected(x, k0, k1, p)), (shape, p, k0, k1)


def test_the_scale_is_pytorchs():
    x = torch.ones(4096)
    for p in (0.1, 0.3, 0.5):
        torch.manual_seed(1)
        stock = F.dropout(x, p, True)
        assert float(stock.max()) == hashed.threshold_and_scale(p)[1]  # 1 / (1 - p) in float32


def test_each_element_is_kept_with_probability_one_minus_p_independently():
    torch.manual_seed(3)
    n = 1 << 20
    for p in (0.1, 0.5):
        k0, k1 = hashed.draw_keys()
        keep = hashed.reference_mask(n, k0, k1, hashed.threshold_and_scale(p)[0]).double()
        q = 1 - p
        sigma = (q * p / n) ** 0.5
        assert abs(float(keep.mean()) - q) < 5 * sigma, p
        # neighbours (along a row and one row of 256 apart) are kept together as often as
        # independent draws are
        for lag in (1, 256):
            both = float((keep[:-lag] * keep[lag:]).mean())
            assert abs(both - q * q) < 5 * (q * q * (1 - q * q) / n) ** 0.5, (p, lag)
    # two calls draw other masks; the same seed the same one
    x = torch.ones(64, 64)
    torch.manual_seed(5)
    a, b = hashed.dropout(x, 0.5), hashed.dropout(x, 0.5)
    torch.manual_seed(5)
    assert not torch.equal(a, b) and torch.equal(a, hashed.dropout(x, 0.5))


def test_the_backward_applies_the_forwards_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 16, 24, requires_grad=True)
    grad = torch.randn(3, 16, 16, 24)
    torch.manual_seed(7)
    y = Dropout(0.1).train()(x)
    y.backward(grad)
    torch.manual_seed(7)
    k0, k1 = hashed.draw_keys()
    assert torch.equal(y.detach(), _expected(x.detach(), k0, k1, 0.1))
    assert torch.equal(x.grad, _expected(grad, k0, k1, 0.1))


def test_a_non_contiguous_input_is_masked_in_its_logical_order():
    torch.manual_seed(0)
    base = torch.randn(2, 8, 6, 5)
    x = base.permute(0, 2, 3, 1)  # not contiguous
    torch.manual_seed(2)
    y = hashed.dropout(x, 0.3)
    torch.manual_seed(2)
    k0, k1 = hashed.draw_keys()
    assert torch.equal(y, _expected(x.contiguous(), k0, k1, 0.3))


def test_the_same_bits_on_one_thread_or_two():
    x = torch.randn(4, 64, 64, 24)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(native_ops().dropout_apply(x, 11, 22, 1 << 22, 4 / 3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_outside_training_and_where_it_does_not_apply_it_is_pytorchs_dropout():
    x = torch.randn(4, 8)
    assert hashed.dropout(x, 0.1, training=False) is x
    assert hashed.dropout(x, 0.0) is x  # F.dropout with p = 0: nothing dropped
    assert not hashed.native_dropout_applies(x.double(), 0.1, True)
    assert not hashed.native_dropout_applies(x, 1.0, True)
    with fast_path(False):
        assert not hashed.native_dropout_applies(x, 0.1, True)
    assert hashed.native_dropout_applies(x, 0.1, True)
    assert torch.equal(hashed.dropout(x, 1.0), torch.zeros_like(x))


def test_the_kernel_refuses_what_it_cannot_read():
    ops = native_ops()
    x = torch.randn(4, 6)
    for bad, args in [(x.t(), (1, 2, 10, 1.0)), (x.double(), (1, 2, 10, 1.0)),
                      (x, (-1, 2, 10, 1.0)), (x, (1, 2**32, 10, 1.0)),
                      (x, (1, 2, (1 << 24) + 1, 1.0)), (x, (1, 2, -1, 1.0))]:
        with pytest.raises(RuntimeError):
            ops.dropout_apply(bad, *args)


def test_lmnet_trains_its_mlps_with_it_and_keeps_its_parameters():
    model = lmnet.create_model("lmnet")
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is Dropout for m in drops)
    mlp_drops = [m for name, m in model.named_modules() if name.endswith(("drop1", "drop2"))]
    assert mlp_drops and all(m.p == 0.1 for m in mlp_drops)
    assert not any(k.endswith(("drop1", "drop2")) for k in model.state_dict())
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # evaluation: no dropout
