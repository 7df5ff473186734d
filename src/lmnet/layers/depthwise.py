"""A depthwise convolution whose weight gradient is lmnet's native kernel where PyTorch's is slow:
:func:`depthwise_conv`.

PyTorch's CPU convolutions (oneDNN) have a depthwise kernel for the weight gradient of a 3 x 3
only. A larger depthwise kernel (LM-Net's 5 x 5 branch, the 7 x 7 and dilated branches of Table 6,
and every deployed multi-branch block, whose branches fold into one 5 x 5) takes oneDNN's grouped
convolution path, which computes 16 x 16 channel blocks of which it keeps one diagonal: 70 ms at
8 x 24 x 256 x 256 for the 5 x 5, where the 3 x 3 takes 5 ms (``docs/performance.md``). The native
kernel (``_native/depthwise.cpp``) computes the same sums, one multiply-add per tap, channel and
pixel: 11 ms there. The forward and the input gradient stay PyTorch's (oneDNN's depthwise kernels
are fast for them).

The weight gradient equals PyTorch's up to the summation order of fp32 (the native one sums each
row in float and the rows in double), the same bits on any number of threads.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lmnet.layers.native import native_ops

__all__ = ["depthwise_conv", "native_weight_grad_applies", "NATIVE"]

#: Use the native weight gradient where it applies. False: PyTorch's own, as lmnet did before; for
#: comparisons (``benchmarks/bench_train_fast.py``, the tests).
NATIVE = True


def native_weight_grad_applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether :func:`depthwise_conv` takes the native weight gradient for ``conv`` on ``x``: a
    stride-1, zero-padded depthwise convolution larger than 3 x 3 (or dilated; where oneDNN has no
    depthwise kernel for it), training a float32 weight on channels-last CPU maps, outside
    autocast, tracing, export and compilation."""
    c = conv.in_channels
    return (NATIVE and torch.is_grad_enabled() and conv.weight.requires_grad
            and type(conv) is nn.Conv2d and conv.groups == c == conv.out_channels
            and conv.stride == (1, 1) and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple)
            and (max(conv.kernel_size) > 3 or max(conv.dilation) > 1)
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.shape[1] == c and conv.weight.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.jit.is_scripting() and not torch.onnx.is_in_onnx_export()
            and not torch.compiler.is_compiling()
            and native_ops() is not None)


def depthwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, with the native weight gradient where :func:`native_weight_grad_applies`."""
    if not native_weight_grad_applies(conv, x):
        return conv(x)
    return _DepthwiseConv.apply(x, conv.weight, conv.bias, conv.padding, conv.dilation)


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation, ctx.has_bias = padding, dilation, bias is not None
        return F.conv2d(x, weight, bias, 1, padding, dilation, x.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], list(ctx.padding), list(ctx.dilation), False,
                [0, 0], x.shape[1], [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            kh, kw = weight.shape[2:]
            dw = native_ops().depthwise_weight_grad(grad, x, kh, kw, *ctx.padding, *ctx.dilation)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad.sum((0, 2, 3))
        return dx, dw, db, None, None
