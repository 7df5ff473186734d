"""The sum of training-mode batch normalisations of several maps, then an activation, as one
operation: ``y = act(sum_b BN_b(z_b))`` (one map: a single ``BatchNorm2d``; ``act``: none,
Hardswish or the exact (erf) GELU natively; any other module is applied after the native sum).

In LM-Net's multi-branch block the four depthwise branches each end in a BatchNorm and are summed;
at 256 x 256 the 24-channel maps are 50 MB each at batch 8, and a training step on a 2-core CPU is
limited by memory traffic, not arithmetic (``docs/performance.md``). PyTorch runs K
normalisations and K - 1 additions, each reading and writing whole maps, and a channels-last
BatchNorm backward several times slower than the bandwidth allows. The native kernel
(``_native/batchnorm_sum.cpp``, :mod:`lmnet.layers.native`) reads each map twice and writes the
sum once, forward and backward alike; the activation is applied on the way out and its
derivative recomputed in the backward from the maps it reads anyway (GELU's erf by the same
rational formula PyTorch's vectorised CPU GELU uses, so its values agree with PyTorch's to a few
units of fp32 rounding).

:func:`batchnorm_sum` is exact to ``act(sum(bn(z) for bn, z in zip(bns, zs)))`` in training mode, up to
the summation order of fp32: the same normalisation (biased batch variance), the same update of
the running statistics (unbiased variance, ``momentum``, ``num_batches_tracked``), the same
gradients. It takes the native path for float32 channels-last CPU maps in training mode (under
bf16 autocast too: the maps cast to float32 and the result float32, where the modules would
give bf16; see :func:`~lmnet.layers.native.kernel_dtype`) and falls back to the modules
themselves everywhere else (evaluation, CUDA, export, compilation, or no native build).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from lmnet.layers.native import (fp32_backward, fp32_forward, in_plain_eager, kernel_dtype,
                                 native_ops)

__all__ = ["batchnorm_sum", "norm_act", "reference_batchnorm_sum", "activation_code", "NATIVE", "ACTIVATIONS"]

#: Activations the native kernel applies: the module type -> its code in the C++ source
#: (``nn.GELU`` only with ``approximate="none"``; see :func:`activation_code`).
ACTIVATIONS = {type(None): 0, nn.Hardswish: 1, nn.GELU: 2}

#: Apply GELU in the native kernel. False: PyTorch's GELU after the native sum, as lmnet did
#: before; for comparisons (``benchmarks/bench_train_fast.py``).
NATIVE_GELU = True

#: Use the native kernel where it applies. False: PyTorch's modules, as lmnet did before; for
#: comparisons (``benchmarks/bench_train_fast.py``, the tests).
NATIVE = True


def reference_batchnorm_sum(zs: Sequence[torch.Tensor], bns: Sequence[nn.BatchNorm2d],
                            act: nn.Module | None = None) -> torch.Tensor:
    """The stock formulation: each module on its map, summed left to right, then ``act``."""
    out = bns[0](zs[0])
    for bn, z in zip(bns[1:], zs[1:]):
        out = out + bn(z)
    return out if act is None else act(out)


def activation_code(act: nn.Module | None) -> int | None:
    """The C++ source's code for ``act``, or None where the kernel does not compute it (then
    ``act`` runs as a module after the native sum)."""
    if isinstance(act, nn.GELU) and (act.approximate != "none" or not NATIVE_GELU):
        return None
    return ACTIVATIONS.get(type(act))


def _native_applies(zs: Sequence[torch.Tensor], bns: Sequence[nn.BatchNorm2d]) -> bool:
    z0 = zs[0]
    return (NATIVE and z0.device.type == "cpu" and kernel_dtype(z0) and z0.dim() == 4
            and all(bn.training and bn.affine and bn.track_running_stats and type(bn) is nn.BatchNorm2d
                    and bn.weight.dtype == torch.float32 for bn in bns)
            and all(z.shape == z0.shape and z.dtype == z0.dtype
                    and z.is_contiguous(memory_format=torch.channels_last) for z in zs)
            and len({bn.eps for bn in bns}) == 1
            and in_plain_eager() and z0.numel() // z0.shape[1] > 1
            and native_ops() is not None)


def batchnorm_sum(zs: Sequence[torch.Tensor], bns: Sequence[nn.BatchNorm2d],
                  act: nn.Module | None = None) -> torch.Tensor:
    """``act(sum_b bns[b](zs[b]))``; the native kernel where it applies (see the module
    docstring), else :func:`reference_batchnorm_sum`."""
    if not _native_applies(zs, bns):
        return reference_batchnorm_sum(zs, bns, act)
    code = activation_code(act)
    gamma = torch.stack([bn.weight for bn in bns])
    beta = torch.stack([bn.bias for bn in bns])
    y, mean, var = _BatchNormSum.apply(bns[0].eps, 0 if code is None else code, gamma, beta, *zs)
    n = zs[0].numel() // zs[0].shape[1]
    with torch.no_grad():  # as nn.BatchNorm2d in training mode
        for b, bn in enumerate(bns):
            bn.num_batches_tracked.add_(1)
            factor = (1.0 / float(bn.num_batches_tracked) if bn.momentum is None
                      else bn.momentum)
            bn.running_mean.mul_(1 - factor).add_(mean[b], alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var[b] * (n / (n - 1)), alpha=factor)
    return y if code is not None else act(y)


class _BatchNormSum(torch.autograd.Function):
    @staticmethod
    @fp32_forward
    def forward(ctx: Any, eps: float, act: int, gamma: torch.Tensor, beta: torch.Tensor,
                *zs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ops = native_ops()
        gamma, beta = gamma.detach().contiguous(), beta.detach().contiguous()
        y, mean, invstd, var = ops.bn_sum_forward(list(zs), gamma, beta, float(eps), act)
        ctx.save_for_backward(gamma, beta, mean, invstd, *zs)
        ctx.act = act
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @fp32_backward
    def backward(ctx: Any, grad: torch.Tensor, _mean: Any, _var: Any) -> tuple:
        gamma, beta, mean, invstd, *zs = ctx.saved_tensors
        out = native_ops().bn_sum_backward(grad, list(zs), gamma, beta, mean, invstd, ctx.act)
        dzs, dgamma, dbeta = out[:-2], out[-2], out[-1]
        return (None, None, dgamma if ctx.needs_input_grad[2] else None,
                dbeta if ctx.needs_input_grad[3] else None,
                *(dz if ctx.needs_input_grad[4 + i] else None for i, dz in enumerate(dzs)))


def norm_act(h: torch.Tensor, norm: nn.Module, act: nn.Module) -> torch.Tensor:
    """``act(norm(h))`` for a conv's normalisation: through :func:`batchnorm_sum` while ``norm``
    is a ``BatchNorm2d`` (one native operation in training on a CPU), as the modules once it is
    folded into the conv (deployed: an ``nn.Identity``)."""
    if isinstance(norm, nn.BatchNorm2d):
        return batchnorm_sum([h], [norm], act)
    return act(norm(h))
