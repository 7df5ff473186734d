"""LM-Net multi-branch module (paper Fig. 2) with structural re-parameterisation (Eq. 5-9).

Training form: expand 1x1 -> BN -> Hardswish -> sum of parallel depthwise convs (each with its own
BN) -> GELU -> Squeeze-Excite -> pointwise 1x1, plus a 1x1 shortcut on the block input.
Deployed form: the branches and their BNs become one depthwise convolution with bias whose kernel
covers the largest branch (5x5 for the default branch set); the expand BN is folded too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from lmnet.layers.depthwise import depthwise_conv, depthwise_convs
from lmnet.layers.fuse import bn_scale_shift, fuse_conv_bn
from lmnet.layers.fused_norm import batchnorm_sum, norm_act
from lmnet.layers.squeeze_excite import SqueezeExcite

__all__ = ["BranchSpec", "parse_branches", "MultiBranchBlock", "DEFAULT_BRANCHES"]

#: The branch set of LM-Net (spec): depthwise 5x5, 3x3, 3x1 and 1x3.
DEFAULT_BRANCHES: tuple[str, ...] = ("5x5", "3x3", "3x1", "1x3")

_BRANCH_RE = re.compile(r"^(\d+)x(\d+)(?:d(\d+))?$")


@dataclass(frozen=True)
class BranchSpec:
    """One depthwise branch: kernel ``(kh, kw)`` and dilation; 'same' padding."""

    kh: int
    kw: int
    dilation: int = 1

    @property
    def extent(self) -> tuple[int, int]:
        """Receptive field ``(rows, cols)`` of the (dilated) kernel."""
        return self.dilation * (self.kh - 1) + 1, self.dilation * (self.kw - 1) + 1

    @property
    def name(self) -> str:
        return f"{self.kh}x{self.kw}" + (f"d{self.dilation}" if self.dilation > 1 else "")


def parse_branches(branches: Sequence[str] | str) -> tuple[BranchSpec, ...]:
    """Parse branch names such as ``"3x3"``, ``"1x3"``, ``"7x7"`` or ``"5x5d2"`` (dilated 5x5).

    ``"d5x5"`` is accepted as an alias of ``"5x5d2"``. A comma-separated string works too.
    Raises ``ValueError`` for an empty set, a duplicate, an even kernel or an unknown form.
    """
    if isinstance(branches, str):
        branches = [b for b in branches.replace("+", ",").split(",") if b.strip()]
    specs = []
    for raw in branches:
        name = raw.strip().lower()
        if name.startswith("d") and _BRANCH_RE.match(name[1:]):
            name = name[1:] + "d2"
        m = _BRANCH_RE.match(name)
        if not m:
            raise ValueError(
                f"unknown branch {raw!r}: use 'KHxKW' or 'KHxKWdD', e.g. '3x3', '1x3', '5x5d2'"
            )
        kh, kw, d = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
        if kh % 2 == 0 or kw % 2 == 0 or kh < 1 or kw < 1 or d < 1:
            raise ValueError(f"branch {raw!r}: kernel sizes must be odd and positive, dilation >= 1")
        specs.append(BranchSpec(kh, kw, d))
    if not specs:
        raise ValueError("the multi-branch module needs at least one branch")
    if len(set(specs)) != len(specs):
        raise ValueError(f"duplicate branch in {list(branches)}")
    return tuple(specs)


class MultiBranchBlock(nn.Module):
    """``MB(c_in, c_exp, c_out)``: input ``(B, c_in, H, W)`` -> output ``(B, c_out, H, W)``.

    Args:
        in_channels: ``c_in``.
        expand_channels: ``c_exp``, width of the depthwise stage.
        out_channels: ``c_out``.
        branches: depthwise branch set, see :func:`parse_branches`.
        se_reduction: Squeeze-Excite bottleneck ratio.
    """

    def __init__(
        self,
        in_channels: int,
        expand_channels: int,
        out_channels: int,
        branches: Sequence[str] | str = DEFAULT_BRANCHES,
        se_reduction: int = 4,
    ) -> None:
        super().__init__()
        self.branch_specs = parse_branches(branches)
        c = expand_channels
        self.expand = nn.Conv2d(in_channels, c, 1)
        self.expand_bn: nn.Module = nn.BatchNorm2d(c)
        self.expand_act = nn.Hardswish()
        self.branches = nn.ModuleList()
        for spec in self.branch_specs:
            pad = (spec.dilation * (spec.kh - 1) // 2, spec.dilation * (spec.kw - 1) // 2)
            conv = nn.Conv2d(c, c, (spec.kh, spec.kw), padding=pad, dilation=spec.dilation,
                             groups=c, bias=False)
            self.branches.append(nn.Sequential(conv, nn.BatchNorm2d(c)))
        self.fused: nn.Conv2d | None = None
        self.act = nn.GELU()
        self.se = SqueezeExcite(c, se_reduction)
        self.pointwise = nn.Conv2d(c, out_channels, 1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    @property
    def deployed(self) -> bool:
        """True once :meth:`reparameterize` has run."""
        return self.fused is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BN and activation (of the expand conv; of the branches, summed) as one native
        # operation in training on a CPU, the modules themselves elsewhere
        h = norm_act(self.expand(x), self.expand_bn, self.expand_act)
        # depthwise_conv(s): the native backward of the depthwise convolutions in training on a
        # CPU (the branches' input gradients summed in one pass), the modules themselves elsewhere
        if self.fused is not None:
            h = self.act(depthwise_conv(self.fused, h))
        else:
            h = batchnorm_sum(depthwise_convs([branch[0] for branch in self.branches], h),
                              [branch[1] for branch in self.branches], self.act)
        h = self.se(h)
        return self.pointwise(h) + self.shortcut(x)

    @torch.no_grad()
    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel ``(c, 1, KH, KW)`` and bias ``(c,)`` equal to the BN'd branch sum in eval mode."""
        kh = max(s.extent[0] for s in self.branch_specs)
        kw = max(s.extent[1] for s in self.branch_specs)
        ref = self.branches[0][0].weight
        weight = torch.zeros(ref.shape[0], 1, kh, kw, dtype=ref.dtype, device=ref.device)
        bias = torch.zeros(ref.shape[0], dtype=ref.dtype, device=ref.device)
        for spec, branch in zip(self.branch_specs, self.branches):
            conv, bn = branch[0], branch[1]
            scale, shift = bn_scale_shift(bn)
            eh, ew = spec.extent
            top, left = (kh - eh) // 2, (kw - ew) // 2
            d = spec.dilation
            # Place the (dilated) kernel at the centre of the fused kernel.
            weight[:, :, top:top + eh:d, left:left + ew:d] += conv.weight * scale.reshape(-1, 1, 1, 1)
            bias += shift
        return weight, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold all branches (and the expand BN) into single convolutions. Idempotent, in place."""
        if self.fused is not None:
            return
        weight, bias = self.fused_kernel()
        c, _, kh, kw = weight.shape
        fused = nn.Conv2d(c, c, (kh, kw), padding=(kh // 2, kw // 2), groups=c, bias=True,
                          device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        self.fused = fused
        del self.branches
        self.branches = nn.ModuleList()
        self.expand = fuse_conv_bn(self.expand, self.expand_bn)
        self.expand_bn = nn.Identity()

