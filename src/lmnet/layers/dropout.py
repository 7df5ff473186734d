"""Dropout with a hashed mask on a CPU: :class:`Dropout` (an ``nn.Dropout``) and :func:`dropout`.

In training, on float32 CPU tensors, each element is kept where a hash of its index and two keys
drawn for the call from PyTorch's generator (so ``torch.manual_seed`` fixes them) passes a
threshold, and scaled by ``1 / (1 - p)`` as PyTorch's dropout does; the backward recomputes the
same mask from the keys. The mathematics is PyTorch's (each element kept with probability
``1 - p``, rounded to a multiple of 2^-24, independently of the others as far as the hash goes);
the random numbers differ. Why: PyTorch's CPU dropout draws a whole float map of Bernoulli numbers,
divides, multiplies and keeps the map for its backward; the native kernel
(``_native/dropout.cpp``) reads the input once and writes the output once (the training step's
gain is measured in ``docs/performance.md``, run 7).

:func:`reference_mask` computes the same mask with PyTorch's integer operations, the fallback the
tests compare the kernel with. Elsewhere (evaluation, another device or dtype, tracing, export,
compilation, ``NATIVE`` False, no native kernels) :func:`dropout` is ``F.dropout``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lmnet.layers.native import (fp32_backward, fp32_forward, in_plain_eager, kernel_dtype,
                                 native_ops)

__all__ = ["Dropout", "dropout", "native_dropout_applies", "reference_mask", "NATIVE"]

#: Use the hashed-mask kernel where it applies. False: PyTorch's own dropout, as lmnet did
#: before; for comparisons (``benchmarks/bench_train_fast.py``, the tests).
NATIVE = True

_BITS = 24  # the hash's top 24 bits are compared with the threshold
_U32 = 0xFFFFFFFF


def threshold_and_scale(p: float) -> tuple[int, float]:
    """The kernel's integer threshold for drop probability ``p`` and the float32 scale that
    PyTorch's dropout multiplies kept elements by (``1 / (1 - p)`` computed in float32)."""
    threshold = min(max(round(p * (1 << _BITS)), 0), 1 << _BITS)
    scale = float(torch.ones((), dtype=torch.float32) / (1 - p))
    return threshold, scale


def draw_keys() -> tuple[int, int]:
    """The two 32-bit keys of one call, drawn from PyTorch's default generator."""
    k0, k1 = (int(k) for k in torch.randint(0, 1 << 32, (2,), dtype=torch.int64))
    return k0, k1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 tensors holding 32-bit values, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _U32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def reference_mask(numel: int, k0: int, k1: int, threshold: int) -> torch.Tensor:
    """The kernel's keep mask (bool, ``numel`` elements in memory order) in PyTorch operations."""
    i = torch.arange(numel, dtype=torch.int64)
    u = _mix32(_mix32((i & _U32) ^ k0) ^ (i >> 32) ^ k1)
    return (u >> (32 - _BITS)) >= threshold


def native_dropout_applies(x: torch.Tensor, p: float, training: bool) -> bool:
    """Whether :func:`dropout` takes the native kernel: training, ``0 < p < 1``, a float32 CPU
    tensor (or bf16 under bf16 autocast, cast to float32: :func:`~lmnet.layers.native.kernel_dtype`),
    outside tracing, export and compilation, the kernels built."""
    return (NATIVE and training and 0.0 < p < 1.0 and x.device.type == "cpu"
            and kernel_dtype(x) and in_plain_eager() and native_ops() is not None)


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True,
            inplace: bool = False) -> torch.Tensor:
    """``F.dropout(x, p, training, inplace)``, with the hashed mask where
    :func:`native_dropout_applies` (a new tensor then, even with ``inplace``)."""
    if not native_dropout_applies(x, p, training):
        return F.dropout(x, p, training, inplace)
    return _HashDropout.apply(x, p)


class Dropout(nn.Dropout):
    """``nn.Dropout`` computed by :func:`dropout` (the same parameters and state: none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.inplace)


class _HashDropout(torch.autograd.Function):
    @staticmethod
    @fp32_forward
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        k0, k1 = draw_keys()
        threshold, scale = threshold_and_scale(p)
        ctx.args = (k0, k1, threshold, scale)
        return native_ops().dropout_apply(x.contiguous(), k0, k1, threshold, scale)

    @staticmethod
    @fp32_backward
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return native_ops().dropout_apply(grad.contiguous(), *ctx.args), None
