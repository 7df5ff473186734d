"""Transformer pieces of LM-Net: MLP, pre-norm self-attention layer, GFT bridge and LFT skip block.

Shapes: the GFT works on the bottleneck ``(B, C, H/16, W/16)``; the LFT on a skip map
``(B, c, h, w)``; both return maps of the same layout.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmnet.layers.dropout import Dropout
from lmnet.layers.layer_norm import LayerNorm
from lmnet.layers.neighborhood_attention import NeighborhoodAttention2d

__all__ = ["Mlp", "MultiHeadSelfAttention", "GlobalFeatureTransformer", "LocalFeatureTransformer"]


class Mlp(nn.Module):
    """``Linear(d -> r*d) -> GELU -> Dropout -> Linear(r*d -> d) -> Dropout`` on ``(..., d)``."""

    def __init__(self, dim: int, ratio: float = 2.0, drop: float = 0.1) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class MultiHeadSelfAttention(nn.Module):
    """Global multi-head self-attention on tokens ``(B, N, d)``; one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation: truncated-normal weights (std 0.02), zero biases."""
        for linear in (self.qkv, self.proj):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class GlobalFeatureTransformer(nn.Module):
    """GFT bridge: global pyramid, conv embedding, one pre-norm transformer layer, 1x1 out.

    Args:
        in_channels: channels of the inputs ``x1 .. x5`` (multi-scale) or of ``x5`` alone
            (single-scale, where a 1x1 conv lifts it to ``dim``).
        out_channels: channels of the result ``g`` at ``H/16``.
        dim: token width (372 = sum of the encoder widths in LM-Net).
        num_heads, mlp_ratio, drop: transformer settings.
        multiscale: pool every encoder stage to ``H/16`` and concatenate (LM-Net); else single-scale.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, dim: int | None = None,
                 num_heads: int = 12, mlp_ratio: float = 2.0, drop: float = 0.1,
                 multiscale: bool = True) -> None:
        super().__init__()
        self.multiscale = multiscale
        dim = dim or sum(in_channels)
        if multiscale:
            if sum(in_channels) != dim:
                raise ValueError("multi-scale GFT: dim must equal the sum of the input channels")
            self.lift: nn.Module = nn.Identity()
        else:
            self.lift = nn.Conv2d(in_channels[-1], dim, 1)
        self.embed = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio, drop)
        self.out = nn.Conv2d(dim, out_channels, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """``feats``: encoder maps, finest first, the last at ``H/16``; returns ``(B, out, H/16, W/16)``."""
        x5 = feats[-1]
        if self.multiscale:
            # H is a multiple of 16, so adaptive pooling to x5's size is plain average pooling;
            # written this way it exports with dynamic spatial size.
            h5 = x5.shape[-2]
            pooled = [F.avg_pool2d(f, f.shape[-2] // h5) if f.shape[-2] != h5 else f
                      for f in feats[:-1]]
            x = torch.cat([*pooled, x5], dim=1)
        else:
            x = self.lift(x5)
        e = self.embed(x)
        B, C, H, W = e.shape
        t = e.flatten(2).transpose(1, 2)  # (B, N, C)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return self.out(t.transpose(1, 2).reshape(B, C, H, W))


class LocalFeatureTransformer(nn.Module):
    """LFT: conv embedding, then ``a = e + NA(LN(e))``, ``out = a + MLP(LN(a))`` on ``(B, c, h, w)``."""

    def __init__(self, dim: int, num_heads: int = 12, kernel_size: int = 3,
                 mlp_ratio: float = 2.0, drop: float = 0.1, position_bias: bool = True) -> None:
        super().__init__()
        self.embed = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = LayerNorm(dim)
        self.attn = NeighborhoodAttention2d(dim, num_heads, kernel_size, bias=position_bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x).permute(0, 2, 3, 1)  # (B, h, w, c)
        a = e + self.attn(self.norm1(e))
        out = a + self.mlp(self.norm2(a))
        return out.permute(0, 3, 1, 2)
