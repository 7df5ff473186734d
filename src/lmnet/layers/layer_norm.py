"""Layer normalisation over the last dimension with a native CPU kernel in training:
:class:`LayerNorm` (an ``nn.LayerNorm``: the same parameters, state dict and mathematics).

LM-Net's local transformers normalise maps of 12 to 96 channels per pixel (``(B, H, W, C)``
tokens); PyTorch's CPU LayerNorm pays a per-row overhead that dominates at so few channels (23 ms
forward and 40 ms backward a call at 8 x 256 x 256 x 12 in a profiled training step). The native
kernel (``_native/layer_norm.cpp``) computes the same normalisation (biased variance, ``eps``
inside the square root) and its gradients in one pass each, the parameters' gradients summed in a
fixed order (the same bits on any number of threads). It applies under autograd to float32 CPU
tensors normalised over their last dimension with a weight and a bias, in plain eager PyTorch
(under bf16 autocast too: a bf16 input is cast, the output is float32);
everywhere else (evaluation, export, tracing, compilation, another dtype or device, ``NATIVE``
False, no native kernels) :class:`LayerNorm` is ``nn.LayerNorm``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lmnet.layers.native import (fp32_backward, fp32_forward, in_plain_eager, kernel_dtype,
                                 native_ops)

__all__ = ["LayerNorm", "native_layer_norm_applies", "NATIVE"]

#: Use the native kernel where it applies. False: PyTorch's own LayerNorm, as lmnet did before;
#: for comparisons (``benchmarks/bench_train_fast.py``, the tests).
NATIVE = True


def native_layer_norm_applies(norm: nn.LayerNorm, x: torch.Tensor) -> bool:
    """Whether :class:`LayerNorm` ``norm`` computes ``x`` with the native kernel: autograd
    recording, a float32 CPU input (or bf16 under bf16 autocast: computed in float32, see
    :func:`~lmnet.layers.native.kernel_dtype`) normalised over its last dimension with a weight
    and a bias, outside tracing, export and compilation, the kernels built."""
    w, b = norm.weight, norm.bias
    return (NATIVE and torch.is_grad_enabled() and in_plain_eager()
            and len(norm.normalized_shape) == 1 and w is not None and b is not None
            and any(t.requires_grad for t in (x, w, b))
            and all(t.device.type == "cpu" for t in (x, w, b)) and kernel_dtype(x, w, b)
            and x.dim() >= 1 and x.shape[-1] == norm.normalized_shape[0] and x.numel() > 0
            and native_ops() is not None)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed by the native kernel where :func:`native_layer_norm_applies`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not native_layer_norm_applies(self, x):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return _NativeLayerNorm.apply(x, self.weight, self.bias, self.eps)


class _NativeLayerNorm(torch.autograd.Function):
    @staticmethod
    @fp32_forward
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.contiguous().view(-1, shape[-1])
        w = weight.detach().contiguous()
        y, mean, rstd = native_ops().layer_norm_forward(x2, w, bias.detach().contiguous(),
                                                        float(eps))
        ctx.save_for_backward(x2, mean, rstd, w)
        return y.view(shape)

    @staticmethod
    @fp32_backward
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x2, mean, rstd, w = ctx.saved_tensors
        dx, dw, db = native_ops().layer_norm_backward(grad.reshape(x2.shape), x2, mean, rstd, w)
        need = ctx.needs_input_grad
        return (dx.view(grad.shape) if need[0] else None, dw if need[1] else None,
                db if need[2] else None, None)
