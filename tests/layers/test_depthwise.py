"""The native backward of depthwise convolutions (``lmnet.layers.depthwise``: the weight gradient of
the larger kernels, the input gradient of several branches summed in one pass) equals PyTorch's
within fp32 rounding, for every kernel form it takes (odd channel counts, dilation, unequal or no
padding, widths with and without a register-blocked loop, a bias), the same bits on one thread or
two; where it does not apply, the modules themselves run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lmnet.layers import depthwise, depthwise_conv, depthwise_convs
from lmnet.layers.depthwise import native_backward_applies
from lmnet.layers.native import native_ops

pytestmark = pytest.mark.skipif(native_ops() is None, reason="lmnet's native kernels do not build here")


def _grads(conv: nn.Conv2d, x: torch.Tensor, native: bool) -> tuple[torch.Tensor, ...]:
    conv.zero_grad()
    x = x.detach().clone().requires_grad_()
    before, depthwise.NATIVE = depthwise.NATIVE, native
    try:
        out = depthwise_conv(conv, x)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).contiguous(
            memory_format=torch.channels_last))
    finally:
        depthwise.NATIVE = before
    found = [out.detach(), x.grad, conv.weight.grad.clone()]
    if conv.bias is not None:
        found.append(conv.bias.grad.clone())
    return tuple(found)


@pytest.mark.parametrize("channels,kernel,padding,dilation,bias", [
    (24, (5, 5), (2, 2), 1, False),    # LM-Net's 5 x 5 branch
    (13, (5, 5), (2, 2), 1, True),     # channels left over from the blocks of eight; a bias
    (16, (7, 7), (3, 3), 1, False),
    (8, (5, 5), (4, 4), 2, False),     # 5x5d2 of Table 6
    (9, (3, 3), (2, 2), 2, False),     # a dilated 3 x 3
    (10, (9, 5), (4, 2), 1, False),    # a width without its own loop: the plain one
    (12, (5, 7), (0, 1), 1, True),     # padding smaller than 'same': a smaller output
    (8, (1, 5), (0, 2), 1, False),
])
def test_native_weight_grad_equals_pytorch(channels, kernel, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, kernel, padding=padding, dilation=dilation,
                     groups=channels, bias=bias)
    x = torch.randn(2, channels, 11, 14).contiguous(memory_format=torch.channels_last)
    assert native_backward_applies([conv], x)
    native, stock = _grads(conv, x, True), _grads(conv, x, False)
    assert len(native) == len(stock) == 3 + bias
    for name, a, b in zip(("output", "input", "weight", "bias"), native, stock):
        scale = float(b.abs().max())
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale), (name, float((a - b).abs().max()))


def _branch_grads(convs: list[nn.Conv2d], x: torch.Tensor, native: bool) -> list[torch.Tensor]:
    for conv in convs:
        conv.zero_grad()
    x = x.detach().clone().requires_grad_()
    before, depthwise.NATIVE = depthwise.NATIVE, native
    try:
        outs = depthwise_convs(convs, x)
        # the second branch's output unused: its gradient is zero
        loss = sum((o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum()
                   for i, o in enumerate(outs) if i != 1)
        loss.backward()
    finally:
        depthwise.NATIVE = before
    found = [*(o.detach() for o in outs), x.grad]
    for conv in convs:
        found += [torch.full((1,), float('nan')) if p.grad is None else p.grad.clone()
                  for p in conv.parameters()]  # None (NaN here) on both paths, or equal
    return found


@pytest.mark.parametrize("channels", [24, 13])
def test_native_branches_backward_equals_pytorch(channels):
    """LM-Net's four branches and Table 6's wider ones, one with a bias, of one input."""
    torch.manual_seed(3)
    c = channels
    convs = [nn.Conv2d(c, c, (5, 5), padding=2, groups=c, bias=False),
             nn.Conv2d(c, c, (3, 3), padding=1, groups=c, bias=True),
             nn.Conv2d(c, c, (3, 1), padding=(1, 0), groups=c, bias=False),
             nn.Conv2d(c, c, (1, 3), padding=(0, 1), groups=c, bias=False),
             nn.Conv2d(c, c, (5, 5), padding=4, dilation=2, groups=c, bias=False),
             nn.Conv2d(c, c, (7, 7), padding=3, groups=c, bias=False)]
    x = torch.randn(2, c, 12, 15).contiguous(memory_format=torch.channels_last)
    assert native_backward_applies(convs, x)
    assert native_backward_applies(convs[1:4], x)  # 3 x 3 and smaller: a native input gradient
    native, stock = _branch_grads(convs, x, True), _branch_grads(convs, x, False)
    assert len(native) == len(stock) == len(convs) + 1 + len(convs) + 1
    for i, (a, b) in enumerate(zip(native, stock)):
        scale = float(b.nan_to_num().abs().max()) or 1.0
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale, equal_nan=True), (i, float((a - b).abs().max()))


def test_native_weight_grad_has_the_same_bits_on_one_thread_or_two():
    torch.manual_seed(1)
    x = torch.randn(3, 24, 40, 37).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(3, 24, 40, 37).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        found = []
        for n in (1, 2):
            torch.set_num_threads(n)
            found.append(native_ops().depthwise_weight_grad(dy, x, 5, 5, 2, 2, 1, 1))
            found.append(native_ops().depthwise_input_grad([dy, x], [torch.ones(24, 1, 5, 5),
                                                                  torch.ones(24, 1, 3, 3)],
                                                         [2, 2, 1, 1, 1, 1, 1, 1], 40, 37))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(found[0], found[2]) and torch.equal(found[1], found[3])


def test_depthwise_conv_leaves_what_pytorch_does_well_to_pytorch():
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    five = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False)
    assert native_backward_applies([five], x)
    assert not native_backward_applies([nn.Conv2d(8, 8, 3, padding=1, groups=8)], x)  # one 3 x 3: oneDNN
    assert not native_backward_applies([nn.Conv2d(8, 8, 5, padding=2)], x)  # not depthwise
    assert not native_backward_applies([nn.Conv2d(8, 8, 5, 2, padding=2, groups=8)], x)  # stride 2
    assert not native_backward_applies([five], x.contiguous())  # not channels-last
    with torch.no_grad():
        assert not native_backward_applies([five], x)
    five.weight.requires_grad_(False)
    assert not native_backward_applies([five], x)


def test_native_weight_grad_refuses_shapes_it_cannot_read():
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="shape does not fit"):  # dy of a 3 x 3, kernel 5 x 5
        native_ops().depthwise_weight_grad(x, x, 5, 5, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="channels-last"):
        native_ops().depthwise_weight_grad(x.contiguous(), x.contiguous(), 3, 3, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="positive"):
        native_ops().depthwise_weight_grad(x, x, 0, 3, 1, 1, 1, 1)
    w3 = torch.ones(8, 1, 3, 3)
    with pytest.raises(RuntimeError, match="shape does not fit"):  # input 10 x 9: dy is 9 x 9
        native_ops().depthwise_input_grad([x], [w3], [1, 1, 1, 1], 10, 9)
    with pytest.raises(RuntimeError, match="four geometry numbers"):
        native_ops().depthwise_input_grad([x], [w3], [1, 1, 1], 9, 9)
    with pytest.raises(RuntimeError, match=r"\(C, 1, kh, kw\)"):
        native_ops().depthwise_input_grad([x], [torch.ones(7, 1, 3, 3)], [1, 1, 1, 1], 9, 9)
