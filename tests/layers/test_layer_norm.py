"""The native LayerNorm (``layers/_native/layer_norm.cpp``) computes ``nn.LayerNorm``: outputs and
the input's, weight's and bias's gradients against PyTorch in float64, for LM-Net's channel counts
(compiled for them) and others; the same bits on one thread or two; the module keeps
``nn.LayerNorm``'s parameters and state dict and falls back to it wherever the kernel does not
apply; the kernel refuses what it cannot compute."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lmnet.layers import layer_norm
from lmnet.layers.layer_norm import LayerNorm, native_layer_norm_applies
from lmnet.layers.native import native_ops

pytestmark = pytest.mark.skipif(native_ops() is None, reason="lmnet's native kernels do not build here")


def _norm(channels: int, seed: int = 0) -> LayerNorm:
    norm = LayerNorm(channels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=g))
        norm.bias.copy_(torch.randn(channels, generator=g))
    return norm


@pytest.mark.parametrize("shape", [
    (2, 9, 7, 12),       # LM-Net's full-resolution tokens (B, H, W, 12)
    (3, 5, 6, 24), (1, 4, 4, 48), (2, 3, 5, 96),
    (2, 7, 372),         # the bridge's tokens (B, N, 372): the kernel's general path
    (4097, 13),          # rows over two blocks of the parameter gradients' sums, an odd count
])
def test_native_layer_norm_equals_pytorch_in_float64(shape):
    norm = _norm(shape[-1])
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3 + 2).requires_grad_()
    grad = torch.randn(shape, generator=g)
    assert native_layer_norm_applies(norm, x)
    y = norm(x)
    got = torch.autograd.grad(y, (x, norm.weight, norm.bias), grad)
    ref_in = [t.detach().double().requires_grad_() for t in (x, norm.weight, norm.bias)]
    ref = F.layer_norm(ref_in[0], (shape[-1],), ref_in[1], ref_in[2], norm.eps)
    want = torch.autograd.grad(ref, ref_in, grad.double())
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "weight", "bias"), got, want):
        scale = float(b.abs().max())
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5 * scale), \
            (name, float((a.double() - b).abs().max()), scale)


def test_same_bits_on_one_thread_or_two_and_through_a_strided_input():
    norm = _norm(12)
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 12, 40, 30, generator=g).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 40, 30, 12, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = base.detach().clone().requires_grad_()
            tokens = x.permute(0, 2, 3, 1)  # as LM-Net's transformers read a channels-last map
            y = norm(tokens)
            results.append((y, *torch.autograd.grad(y, (x, norm.weight, norm.bias), grad)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    x = base.detach().clone().requires_grad_()
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (12,), norm.weight, norm.bias, norm.eps)
    assert torch.allclose(results[0][0], ref, rtol=1e-5, atol=1e-5)


def test_module_is_an_nn_layer_norm_and_falls_back_where_the_kernel_does_not_apply():
    norm = _norm(12)
    assert isinstance(norm, nn.LayerNorm)
    assert list(norm.state_dict()) == list(nn.LayerNorm(12).state_dict())
    x = torch.randn(2, 5, 12, requires_grad=True)
    assert native_layer_norm_applies(norm, x)
    with torch.no_grad():  # evaluation: PyTorch's own, the same numbers
        assert not native_layer_norm_applies(norm, x)
        assert torch.equal(norm(x), F.layer_norm(x, (12,), norm.weight, norm.bias, norm.eps))
    assert not native_layer_norm_applies(norm, x.double())
    assert not native_layer_norm_applies(LayerNorm(12, elementwise_affine=False), x)
    assert not native_layer_norm_applies(LayerNorm((5, 12)), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the kernel, in float32 (as autocast's)
        assert native_layer_norm_applies(norm, x) and norm(x).dtype == torch.float32
        assert native_layer_norm_applies(norm, x.bfloat16())
        assert not native_layer_norm_applies(norm, x.half())  # not autocast's dtype
    with torch.autocast("cpu", dtype=torch.float16):  # fp16 autocast: float32 inputs only
        assert not native_layer_norm_applies(norm, x.half())
    before = layer_norm.NATIVE
    try:
        layer_norm.NATIVE = False
        assert not native_layer_norm_applies(norm, x)
    finally:
        layer_norm.NATIVE = before
    traced = torch.jit.trace(norm.eval(), torch.randn(1, 3, 12), check_trace=False)
    assert "lmnet_native" not in str(traced.graph)


@pytest.mark.parametrize("call,message", [
    (lambda x, w: torch.ops.lmnet_native.layer_norm_forward(x.t(), w, w, 1e-5), "contiguous"),
    (lambda x, w: torch.ops.lmnet_native.layer_norm_forward(x, w[:3], w[:3], 1e-5), "weight"),
    (lambda x, w: torch.ops.lmnet_native.layer_norm_forward(x, w, w[:3], 1e-5), "bias"),
    (lambda x, w: torch.ops.lmnet_native.layer_norm_forward(x.double(), w, w, 1e-5), "float32"),
    (lambda x, w: torch.ops.lmnet_native.layer_norm_backward(x[:2], x, w, w, w), "gradient"),
    (lambda x, w: torch.ops.lmnet_native.layer_norm_backward(x, x, w[:2], w, w), "mean and rstd"),
])
def test_kernel_refuses_what_it_cannot_compute(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(torch.randn(4, 4), torch.randn(4))
