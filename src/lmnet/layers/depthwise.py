"""Depthwise convolutions of one input (LM-Net's parallel branches) with lmnet's native backward
where PyTorch's is slow: :func:`depthwise_convs` (and :func:`depthwise_conv` for one).

The weight gradient: PyTorch's CPU convolutions (oneDNN) have a depthwise kernel for the weight
gradient of a 3 x 3 only. A larger depthwise kernel (LM-Net's 5 x 5 branch, the 7 x 7 and dilated
branches of Table 6, and every deployed multi-branch block, whose branches fold into one 5 x 5)
takes oneDNN's grouped convolution path, which computes 16 x 16 channel blocks of which it keeps
one diagonal: 70 ms at 8 x 24 x 256 x 256 for the 5 x 5, where the 3 x 3 takes 5 ms
(``docs/performance.md``). The native kernel (``_native/depthwise.cpp``) computes the same sums,
one multiply-add per tap, channel and pixel: 11 ms there. Kernels of 3 x 3 and smaller keep
oneDNN's.

The input gradient: the branches read the same map, so its gradient is the sum of theirs. PyTorch
computes one per branch and adds them (four whole maps written, three additions); the native
kernel sums every branch's taps into one pass that writes the gradient once (35 ms against 128 ms
for LM-Net's four branches at 8 x 24 x 256 x 256). The forward stays PyTorch's (oneDNN's depthwise
forward is fast).

Both equal PyTorch's up to the summation order of fp32 (the weight gradient sums each row in float
and the rows in double), the same bits on any number of threads.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lmnet.layers.native import (fp32_backward, fp32_forward, in_plain_eager, kernel_dtype,
                                 native_ops)

__all__ = ["depthwise_convs", "depthwise_conv", "native_backward_applies", "NATIVE"]

#: Use the native backward where it applies. False: PyTorch's own, as lmnet did before; for
#: comparisons (``benchmarks/bench_train_fast.py``, the tests).
NATIVE = True


def _native_weight_grad(kernel: Sequence[int], dilation: Sequence[int]) -> bool:
    """Where oneDNN has no depthwise kernel for the weight gradient: larger than 3 x 3, dilated."""
    return max(kernel) > 3 or max(dilation) > 1


def native_backward_applies(convs: Sequence[nn.Conv2d], x: torch.Tensor) -> bool:
    """Whether :func:`depthwise_convs` takes the native backward for ``convs`` on ``x``: stride-1,
    zero-padded depthwise convolutions of ``x``'s channels, training float32 weights on a
    channels-last CPU map (float32, or bf16 under bf16 autocast: then computed in float32, forward
    included, see :func:`~lmnet.layers.native.kernel_dtype`), outside tracing, export and
    compilation (a single convolution only where its weight gradient is native: larger than
    3 x 3 or dilated)."""
    c = x.shape[1] if x.dim() == 4 else -1
    return (NATIVE and len(convs) > 0 and torch.is_grad_enabled()
            and all(type(conv) is nn.Conv2d and conv.groups == c == conv.in_channels == conv.out_channels
                    and conv.stride == (1, 1) and conv.padding_mode == "zeros"
                    and isinstance(conv.padding, tuple) and conv.weight.requires_grad
                    and conv.weight.dtype == torch.float32 for conv in convs)
            and (len(convs) > 1 or _native_weight_grad(convs[0].kernel_size, convs[0].dilation))
            and x.device.type == "cpu" and kernel_dtype(x)
            and x.is_contiguous(memory_format=torch.channels_last)
            and in_plain_eager()
            and native_ops() is not None)


def depthwise_convs(convs: Sequence[nn.Conv2d], x: torch.Tensor) -> list[torch.Tensor]:
    """``[conv(x) for conv in convs]``, with the native backward where
    :func:`native_backward_applies` (see the module docstring)."""
    if not native_backward_applies(convs, x):
        return [conv(x) for conv in convs]
    geometry = [(conv.padding, conv.dilation, conv.bias is not None) for conv in convs]
    params = [p for conv in convs for p in (conv.weight, conv.bias) if p is not None]
    return list(_DepthwiseConvs.apply(x, geometry, *params))


def depthwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, with the native backward where :func:`native_backward_applies`."""
    return depthwise_convs([conv], x)[0]


class _DepthwiseConvs(torch.autograd.Function):
    @staticmethod
    @fp32_forward
    def forward(ctx: Any, x: torch.Tensor, geometry: list, *params: torch.Tensor) -> tuple:
        weights, biases, it = [], [], iter(params)
        for _, _, has_bias in geometry:
            weights.append(next(it))
            biases.append(next(it) if has_bias else None)
        ctx.save_for_backward(x, *weights)
        ctx.set_materialize_grads(False)  # an unused branch: no gradient, as PyTorch's
        ctx.geometry = geometry
        c = x.shape[1]
        return tuple(F.conv2d(x, w, b, 1, pad, dil, c)
                     for w, b, (pad, dil, _) in zip(weights, biases, geometry))

    @staticmethod
    @fp32_backward
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        # grads[i] is None where branch i's output was not used: its parameters get none
        x, *weights = ctx.saved_tensors
        c, (h, w) = x.shape[1], x.shape[2:]
        grads = [None if g is None else g.contiguous(memory_format=torch.channels_last)
                 for g in grads]
        used = [i for i, g in enumerate(grads) if g is not None]
        dx = None
        if ctx.needs_input_grad[0] and used:
            flat = [v for i in used for v in (*ctx.geometry[i][0], *ctx.geometry[i][1])]
            dx = native_ops().depthwise_input_grad([grads[i] for i in used],
                                                   [weights[i].contiguous() for i in used],
                                                   flat, h, w)
        out: list[torch.Tensor | None] = []
        needs = iter(ctx.needs_input_grad[2:])
        for g, wt, (pad, dil, has_bias) in zip(grads, weights, ctx.geometry):
            dw = None
            if next(needs) and g is not None:
                if _native_weight_grad(wt.shape[2:], dil):
                    dw = native_ops().depthwise_weight_grad(g, x, wt.shape[2], wt.shape[3], *pad, *dil)
                else:  # oneDNN's depthwise kernel
                    dw = torch.ops.aten.convolution_backward(
                        g, x, wt, None, [1, 1], list(pad), list(dil), False, [0, 0], c,
                        [False, True, False])[1]
            out.append(dw)
            if has_bias:
                out.append(g.sum((0, 2, 3)) if next(needs) and g is not None else None)
        return (dx, None, *out)
