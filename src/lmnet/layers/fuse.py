"""Folding BatchNorm into the convolution in front of it (exact in eval mode)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["bn_scale_shift", "fuse_conv_bn"]


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` such that ``bn(x) == x * scale + shift`` in eval mode."""
    std = torch.sqrt(bn.running_var + bn.eps)
    weight = bn.weight if bn.affine else torch.ones_like(std)
    bias = bn.bias if bn.affine else torch.zeros_like(std)
    scale = weight / std
    return scale, bias - bn.running_mean * scale


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a new convolution equal to ``bn(conv(x))`` in eval mode, with bias."""
    scale, shift = bn_scale_shift(bn)
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    fused.bias.copy_(conv_bias * scale + shift)
    return fused
