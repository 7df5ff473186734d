"""The native neighborhood-attention kernels (``layers/_native/neighborhood_attention.cpp``) equal
the whole-map PyTorch formulation within fp32 rounding: LM-Net's shapes, odd map sizes, every
window size, with and without a position bias, a custom scale, the same bits on one thread or two;
the forward alone outside autograd, forward and backward in training (every input's gradient
against autograd of the PyTorch formulation in float64); they refuse what they cannot compute
with an error, and the model gives the same logits with them and without them."""
from __future__ import annotations

import pytest
import torch

import lmnet
from lmnet.layers import neighborhood_attention as na
from lmnet.layers.native import native_ops
from lmnet.layers.neighborhood_attention import (native_forward_applies, native_training_applies,
                                                 neighborhood_attention_2d)

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
    # with autograd recording, the result still has its gradient (the training kernels ran)
    assert native_training_applies(q, k, v, rpb)
    neighborhood_attention_2d(q, k, v, 2, 3, rpb).sum().backward()
    assert rpb.grad is not None and rpb.grad.abs().sum() > 0


def test_inference_under_bf16_autocast_runs_the_kernel_in_float32():
    """``--precision bf16`` in PyTorch: the attention takes the float32 kernel on its bf16 maps
    (the same result as on those maps cast), not the slower PyTorch formulation in bf16."""
    q, k, v = (torch.randn(1, 8, 9, 11).bfloat16() for _ in range(3))
    rpb = torch.randn(2, 5, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert native_forward_applies(q, k, v, rpb)
        with torch.profiler.profile() as prof:
            out = neighborhood_attention_2d(q, k, v, 2, 3, rpb)
    assert any(e.name == "lmnet_native::neighborhood_attention_forward" for e in prof.events())
    with torch.no_grad():
        assert not native_forward_applies(q, k, v, rpb)  # bf16 outside autocast: PyTorch's
        assert torch.equal(out, neighborhood_attention_2d(q.float(), k.float(), v.float(), 2, 3, rpb))


@pytest.mark.parametrize("shape,heads,ks,bias", [
    ((2, 12, 14, 15), 12, 3, True),    # LM-Net's full-resolution attention: 12 heads of 1 channel
    ((2, 24, 33, 17), 12, 3, True),    # odd sizes, 2 channels a head
    ((1, 8, 9, 11), 2, 5, False),      # no bias
    ((1, 6, 7, 7), 3, 7, True),        # the window as large as the map: every query a border one
    ((3, 16, 12, 10), 4, 5, True),
    ((2, 96, 8, 8), 12, 3, True),      # LM-Net's coarsest attention: 8 channels a head
])
def test_native_training_gradients_equal_autograd_in_float64(shape, heads, ks, bias):
    g = torch.Generator().manual_seed(4)
    inputs64 = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    if bias:
        inputs64.append(torch.randn(heads, 2 * ks - 1, 2 * ks - 1, generator=g,
                                    dtype=torch.float64))
    grad64 = torch.randn(shape, generator=g, dtype=torch.float64)

    def run(inputs: list, grad: torch.Tensor, native: bool) -> tuple:
        inputs = [t.clone().requires_grad_() for t in inputs]
        rpb = inputs[3] if bias else None
        before = na.NATIVE_TRAINING
        try:
            na.NATIVE_TRAINING = native
            assert native_training_applies(*inputs[:3], rpb) == native
            out = neighborhood_attention_2d(*inputs[:3], heads, ks, rpb)
        finally:
            na.NATIVE_TRAINING = before
        return out, torch.autograd.grad(out, inputs, grad)

    out64, grads64 = run(inputs64, grad64, native=False)  # float64: not the native kernel's type
    out, grads = run([t.float() for t in inputs64], grad64.float(), native=True)
    assert torch.allclose(out.double(), out64, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(grads64) == len(inputs64)
    for name, a, b in zip("qkv", grads, grads64):
        scale = float(b.abs().max())
        assert scale > 0 and torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5 * scale), \
            (name, float((a.double() - b).abs().max()), scale)
    if bias:  # sums over the batch and the map: rounding relative to the sum of magnitudes
        assert torch.allclose(grads[3].double(), grads64[3], rtol=1e-5, atol=1e-4), \
            float((grads[3].double() - grads64[3]).abs().max())


def test_native_training_with_a_window_of_one():
    """A window of one key: its weight is 1 whatever the logits: only the values get a gradient."""
    q, k, v = (torch.randn(1, 4, 5, 6, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 1, 1, requires_grad=True)
    assert native_training_applies(q, k, v, rpb)
    out = neighborhood_attention_2d(q, k, v, 2, 1, rpb)
    grad = torch.randn_like(out)
    dq, dk, dv, drpb = torch.autograd.grad(out, (q, k, v, rpb), grad)
    assert torch.equal(out, v) and torch.equal(dv, grad)
    assert not dq.any() and not dk.any() and not drpb.any()


def test_native_training_takes_the_model_s_strided_gradient_and_bits_on_one_thread_or_two():
    """The gradient arrives channels-last (the output projection reads the map permuted), and
    the backward's bits do not depend on the thread count (dk, dv and the bias's gradient are
    summed per (batch, head) plane and then over the batch in a fixed order)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 24, 21, 19, generator=g) for _ in range(3))
    rpb = torch.randn(12, 5, 5, generator=g)
    grad = torch.randn(2, 21, 19, 24, generator=g).permute(0, 3, 1, 2)  # channels-last strides
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            inputs = [t.clone().requires_grad_() for t in (q, k, v, rpb)]
            out = neighborhood_attention_2d(*inputs[:3], 12, 3, inputs[3])
            results.append((out, *torch.autograd.grad(out, inputs, grad)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    contiguous = [t.clone().requires_grad_() for t in (q, k, v, rpb)]
    out = neighborhood_attention_2d(*contiguous[:3], 12, 3, contiguous[3])
    for a, b in zip(torch.autograd.grad(out, contiguous, grad.contiguous()), results[0][1:]):
        assert torch.equal(a, b)


def test_native_training_applies_only_where_it_should():
    q, k, v = (torch.randn(1, 4, 6, 6, requires_grad=True) for _ in range(3))
    assert native_training_applies(q, k, v, None)
    with torch.no_grad():
        assert not native_training_applies(q, k, v, None)  # the forward kernel's case
    assert not native_training_applies(q.detach(), k.detach(), v.detach(), None)
    assert not native_training_applies(q.double(), k.double(), v.double(), None)
    before = na.NATIVE_TRAINING
    try:
        na.NATIVE_TRAINING = False
        assert not native_training_applies(q, k, v, None)
    finally:
        na.NATIVE_TRAINING = before


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


@pytest.mark.parametrize("call,message", [
    (lambda q: torch.ops.lmnet_native.neighborhood_attention_backward(q[:, :, 1:], q, q, q, None,
                                                                       2, 3, 1.0), "gradient"),
    (lambda q: torch.ops.lmnet_native.neighborhood_attention_backward(q.double(), q, q, q, None,
                                                                       2, 3, 1.0), "gradient"),
    (lambda q: torch.ops.lmnet_native.neighborhood_attention_backward(q, q, q, q[:, :2], None,
                                                                       2, 3, 1.0), "one shape"),
    (lambda q: torch.ops.lmnet_native.neighborhood_attention_backward(
        q, q, q, q, torch.zeros(2, 5, 4), 2, 3, 1.0), "bias"),
    (lambda q: torch.ops.lmnet_native.neighborhood_attention_backward(q, q, q, q, None,
                                                                       2, 9, 1.0), "fit"),
])
def test_backward_kernel_refuses_what_it_cannot_compute(call, message):
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


@pytest.mark.parametrize("dim,heads,ks,bias,size", [
    (12, 12, 3, True, (9, 11)),    # LM-Net's full resolution
    (24, 12, 3, True, (8, 8)),
    (8, 2, 5, False, (7, 9)),
])
def test_the_layer_trains_on_one_qkv_map_as_pytorch_computes_it(dim, heads, ks, bias, size):
    """In training the layer reads q, k and v in place from one channels-first qkv map and gets
    its gradient as one tensor: output and every gradient against the PyTorch formulation of the
    same layer in float64."""
    import copy

    from lmnet.layers.neighborhood_attention import NeighborhoodAttention2d

    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(dim, heads, ks, bias=bias).train()
    x = torch.randn(2, *size, dim)
    grad = torch.randn_like(x)
    reference = copy.deepcopy(layer).double()
    x64 = x.double().requires_grad_()
    before = na.NATIVE_TRAINING
    try:
        na.NATIVE_TRAINING = False
        assert not reference._trains_natively(x64)
        out64 = reference(x64)
        want = torch.autograd.grad(out64, [x64, *reference.parameters()], grad.double())
    finally:
        na.NATIVE_TRAINING = before
    x32 = x.clone().requires_grad_()
    assert layer._trains_natively(x32)
    out = layer(x32)
    got = torch.autograd.grad(out, [x32, *layer.parameters()], grad)
    assert torch.allclose(out.double(), out64, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        scale = float(b.abs().max())
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5 * scale), \
            float((a.double() - b).abs().max())
    with torch.no_grad():
        assert not layer._trains_natively(x)  # evaluation: the inference kernel's path
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the kernels in float32, the projections
        assert layer._trains_natively(x32)  # in bf16 (tests/layers/test_fast_path.py)
        assert layer(x32).dtype == torch.bfloat16


def test_kernels_read_channel_slices_in_place_and_write_one_gradient_tensor():
    """q, k and v cut from one map (a batch stride of 3C planes) give what contiguous copies
    give, and ``one_tensor`` returns dq, dk and dv as the slices of one gradient map."""
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(2, 36, 11, 10, generator=g)
    rpb = torch.randn(12, 5, 5, generator=g)
    grad = torch.randn(2, 12, 11, 10, generator=g)
    q, k, v = qkv.chunk(3, dim=1)
    assert not q.is_contiguous()
    ops = torch.ops.lmnet_native
    sliced = ops.neighborhood_attention_forward(q, k, v, rpb, 12, 3, 1.0)
    copied = ops.neighborhood_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(),
                                                rpb, 12, 3, 1.0)
    assert torch.equal(sliced, copied)
    *separate, drpb, empty = ops.neighborhood_attention_backward(
        grad, q.contiguous(), k.contiguous(), v.contiguous(), rpb, 12, 3, 1.0)
    dq, dk, dv, drpb_one, dqkv = ops.neighborhood_attention_backward(grad, q, k, v, rpb, 12, 3,
                                                                     1.0, True)
    assert empty.numel() == 0 and dqkv.shape == qkv.shape and dqkv.is_contiguous()
    assert torch.equal(dqkv, torch.cat(separate, dim=1)) and torch.equal(drpb_one, drpb)
    assert dq.data_ptr() == dqkv.data_ptr()  # slices of it, not copies
