"""Local feature pyramids: LM-Net's multi-scale skip connections.

A skip at target level ``t`` gathers the adjacent encoder stages ``t - 1``, ``t`` and ``t + 1``
(those that exist among ``x1 .. x4``), brings each to level ``t`` (stride-2 Conv3x3 from the finer
level, Conv3x3 at the same level, bilinear Up2 then Conv3x3 from the coarser level), concatenates and
fuses them with ``Conv3x3 -> BN -> GELU``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmnet.layers.fuse import fuse_conv_bn
from lmnet.layers.fused_norm import norm_act

__all__ = ["ConvBnAct", "Up2Conv", "LocalPyramidSkip", "up2"]


def up2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear upsampling by 2 with ``align_corners=True``: ``(B, c, h, w) -> (B, c, 2h, 2w)``."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


class Up2Conv(nn.Module):
    """``Up2`` then ``Conv3x3(c_in -> c_out)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(up2(x))


class ConvBnAct(nn.Module):
    """``Conv3x3 -> BatchNorm -> GELU``; :meth:`reparameterize` folds the BN into the conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn: nn.Module = nn.BatchNorm2d(out_channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_act(self.conv(x), self.bn, self.act)

    def reparameterize(self) -> None:
        """Fold the BatchNorm into the convolution (eval-mode exact). Idempotent."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = fuse_conv_bn(self.conv, self.bn)
            self.bn = nn.Identity()


class LocalPyramidSkip(nn.Module):
    """Multi-scale skip at ``target`` level (0 = x1 at full size .. 3 = x4 at H/8).

    Args:
        channels: encoder widths of ``x1 .. x4``.
        target: level whose width and size the output has.
    """

    def __init__(self, channels: Sequence[int], target: int) -> None:
        super().__init__()
        if not 0 <= target < len(channels):
            raise ValueError(f"target level {target} outside 0..{len(channels) - 1}")
        c_t = channels[target]
        self.target = target
        self.sources = [lvl for lvl in (target - 1, target, target + 1) if 0 <= lvl < len(channels)]
        branches = []
        for lvl in self.sources:
            if lvl < target:
                branches.append(nn.Conv2d(channels[lvl], c_t, 3, stride=2, padding=1))
            elif lvl == target:
                branches.append(nn.Conv2d(channels[lvl], c_t, 3, padding=1))
            else:
                branches.append(Up2Conv(channels[lvl], c_t))
        self.branches = nn.ModuleList(branches)
        self.fuse = ConvBnAct(len(self.sources) * c_t, c_t)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """``feats``: ``[x1, x2, x3, x4]``; returns ``(B, c_t, h_t, w_t)``."""
        parts = [branch(feats[lvl]) for lvl, branch in zip(self.sources, self.branches)]
        return self.fuse(torch.cat(parts, dim=1))
