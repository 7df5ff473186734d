"""The native neighborhood-attention forward (``layers/_native/neighborhood_attention.cpp``) equals
the whole-map PyTorch formulation within fp32 rounding: LM-Net's shapes, odd map sizes, every
window size, with and without a position bias, a custom scale, the same bits on one thread or two;
it runs only outside autograd, refuses what it cannot compute with an error, and the model gives
the same logits with it and without it."""
from __future__ import annotations

import pytest
import torch

import lmnet
from lmnet.layers import neighborhood_attention as na
from lmnet.layers.native import native_ops
from lmnet.layers.neighborhood_attention import native_forward_applies, neighborhood_attention_2d

pytestmark = pytest.mark.skipif(native_ops() is None, reason="lmnet's native kernels do not build here")


def _both(q, k, v, heads, ks, rpb=None, scale=None):
    before = na.NATIVE_FORWARD
    try:
        na.NATIVE_FORWARD = True
        assert native_forward_applies(q, k, v, rpb)
        native = neighborhood_attention_2d(q, k, v, heads, ks, rpb, scale)
        na.NATIVE_FORWARD = False
        assert not native_forward_applies(q, k, v, rpb)
        stock = neighborhood_attention_2d(q, k, v, heads, ks, rpb, scale)
    finally:
        na.NATIVE_FORWARD = before
    return native, stock


@pytest.mark.parametrize("shape,heads,ks,bias", [
    ((1, 12, 40, 36), 12, 3, True),    # LM-Net's full-resolution attention: 12 heads of 1 channel
    ((2, 24, 33, 17), 12, 3, True),    # odd sizes, 2 channels a head
    ((1, 8, 9, 11), 2, 5, False),      # no bias
    ((1, 6, 7, 7), 3, 7, True),        # the window as large as the map: global attention
    ((1, 4, 5, 6), 1, 1, True),        # a window of one: the value itself
    ((3, 16, 12, 10), 4, 5, True),
])
def test_native_forward_equals_pytorch(shape, heads, ks, bias):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    rpb = torch.randn(heads, 2 * ks - 1, 2 * ks - 1, generator=g) if bias else None
    native, stock = _both(q, k, v, heads, ks, rpb)
    assert native.shape == stock.shape == q.shape
    assert torch.allclose(native, stock, rtol=1e-5, atol=1e-5), float((native - stock).abs().max())


def test_large_logits_and_custom_scale():
    """Logits far apart (the softmax's exponential near its range's ends) and a scale of the caller's."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 9, 8, generator=g) * 6 for _ in range(3))
    native, stock = _both(q, k, v, 2, 3, torch.randn(2, 5, 5, generator=g) * 20, scale=3.0)
    assert torch.allclose(native, stock, rtol=1e-5, atol=1e-4), float((native - stock).abs().max())


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 13, 18, generator=g).contiguous(memory_format=torch.channels_last)
    q, k, v = (x[..., i:i + 6].transpose(2, 3) for i in (0, 6, 12))  # strided views (2, 11, 6, 13)
    assert not q.is_contiguous()
    native, stock = _both(q, k, v, 11, 3, torch.randn(11, 5, 5, generator=g))
    assert torch.allclose(native, stock, rtol=1e-5, atol=1e-5)


def test_same_bits_on_one_thread_or_two():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 12, 23, 19, generator=g) for _ in range(3))
    rpb = torch.randn(12, 5, 5, generator=g)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(neighborhood_attention_2d(q, k, v, 12, 3, rpb))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_only_outside_autograd():
    q, k, v = (torch.randn(1, 4, 6, 6) for _ in range(3))
    rpb = torch.zeros(2, 5, 5, requires_grad=True)
    assert not native_forward_applies(q, k, v, rpb)          # training: autograd records the bias
    with torch.no_grad():
        assert native_forward_applies(q, k, v, rpb)
    assert not native_forward_applies(q.double(), k.double(), v.double(), None)
    # with autograd recording, the result still has its gradient (the PyTorch formulation ran)
    neighborhood_attention_2d(q, k, v, 2, 3, rpb).sum().backward()
    assert rpb.grad is not None and rpb.grad.abs().sum() > 0


@pytest.mark.parametrize("call,message", [
    (lambda q: torch.ops.lmnet_native.neighborhood_attention_forward(q, q, q[:, :2], None, 2, 3, 1.0),
     "one shape"),
    (lambda q: torch.ops.lmnet_native.neighborhood_attention_forward(q, q, q, None, 3, 3, 1.0),
     "heads"),
    (lambda q: torch.ops.lmnet_native.neighborhood_attention_forward(q, q, q, None, 2, 4, 1.0),
     "odd"),
    (lambda q: torch.ops.lmnet_native.neighborhood_attention_forward(q, q, q, None, 2, 7, 1.0),
     "fit"),
    (lambda q: torch.ops.lmnet_native.neighborhood_attention_forward(
        q, q, q, torch.zeros(2, 3, 3), 2, 3, 1.0), "bias"),
    (lambda q: torch.ops.lmnet_native.neighborhood_attention_forward(
        q.double(), q.double(), q.double(), None, 2, 3, 1.0), "float32"),
])
def test_kernel_refuses_what_it_cannot_compute(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(torch.randn(1, 4, 6, 6))


def test_deployed_model_same_logits_with_and_without_it():
    torch.manual_seed(0)
    model = lmnet.deploy(lmnet.create_model("lmnet").eval())
    x = torch.randn(1, 3, 64, 48)
    before = na.NATIVE_FORWARD
    try:
        with torch.inference_mode():
            na.NATIVE_FORWARD = True
            native = model(x)
            na.NATIVE_FORWARD = False
            stock = model(x)
    finally:
        na.NATIVE_FORWARD = before
    assert torch.allclose(native, stock, rtol=1e-4, atol=1e-4 * float(stock.abs().max())), \
        float((native - stock).abs().max())


def test_inference_loads_a_built_library_but_never_compiles_one(tmp_path):
    """Where no build exists (a fresh cache), inference computes with PyTorch's operations at once
    and leaves the cache empty (compiling is for training); where one exists it is used."""
    import os
    import subprocess
    import sys

    code = ("import torch, lmnet; from lmnet.layers import neighborhood_attention as na; "
            "from lmnet.layers.native import native_ops; "
            "q = torch.randn(1, 12, 9, 9); "
            "print('applies', na.native_forward_applies(q, q, q, None)); "
            "m = lmnet.deploy(lmnet.create_model('lmnet').eval()); "
            "torch.inference_mode()(m)(torch.randn(1, 3, 32, 32)); "
            "print('loaded', native_ops(build=False) is not None)")
    fresh = tmp_path / "fresh"
    env = {**os.environ, "LMNET_NATIVE_CACHE": str(fresh), "CXX": "no-such-compiler-x"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "applies False" in out.stdout and "loaded False" in out.stdout
    assert "could not be built" not in out.stderr  # it did not even try
    assert not list(fresh.rglob("*.so"))
    built = {**os.environ, "CXX": "no-such-compiler-x"}  # the suite's own build, already there
    out = subprocess.run([sys.executable, "-c", code], env=built, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "applies True" in out.stdout and "loaded True" in out.stdout
