"""2-D neighborhood attention (Hassani et al., NAT) in plain PyTorch, no CUDA extension.

Semantics (as NATTEN, dilation 1): every query attends to exactly ``k x k`` keys. The window of a
query at row ``i`` spans rows ``[s, s + k)`` with ``s = clamp(i - k // 2, 0, H - k)``: near a border
the window is shifted inwards instead of zero-padded. The relative position bias, a table of shape
``(heads, 2k - 1, 2k - 1)``, is indexed by the true offset ``key - query + k - 1`` of each key.

How it is computed (channels-first maps ``(B, C, H, W)``, ``C = heads * head_dim``): the queries are
split into the interior, whose windows are centred, and four border strips ``k // 2`` pixels wide.
For the interior, window position ``(a, b)`` of every query is one strided *view* of the key map
(no copy) and the bias is one number per head and position; the strips gather their keys and biases
with ``index_select``. Each region runs its own softmax over its ``k * k`` logits, and the results are
concatenated. Every step is a whole-map tensor op, so the memory use is a few copies of the map,
autograd works, and the graph exports to ONNX with dynamic batch and spatial size.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["neighborhood_window_index", "neighborhood_attention_2d", "NeighborhoodAttention2d"]

_Shift = Callable[[torch.Tensor, int, int], torch.Tensor]


def neighborhood_window_index(length: int, kernel_size: int, device: torch.device | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions and bias indices of the clamped windows along one axis.

    Returns:
        ``key`` of shape ``(length, k)``: position of the ``j``-th key of query ``i``;
        ``bias`` of shape ``(length, k)``: ``key - i + k - 1``, in ``[0, 2k - 2]``.
    """
    pos = torch.arange(length, device=device)
    start = (pos - kernel_size // 2).clamp(min=0).clamp(max=length - kernel_size)
    key = start[:, None] + torch.arange(kernel_size, device=device)[None, :]
    return key, key - pos[:, None] + (kernel_size - 1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shift: _Shift, ks: int,
            bias: torch.Tensor | None) -> torch.Tensor:
    """Attention of the queries ``q (B, h, d, n, m)`` over their ``ks * ks`` window keys.

    ``shift(t, a, b)`` returns window position ``(a, b)`` of every query, taken from the key or
    value map ``t``, shaped like ``q``; ``bias`` broadcasts to ``(h, ks * ks, n, m)``.
    """
    B, h, d, n, m = q.shape
    logits = []
    for a in range(ks):
        for b in range(ks):
            key = shift(k, a, b)
            pos = a * ks + b
            if d == 1:  # one channel per head: the product is the logit
                logit = q * key if bias is None else torch.addcmul(bias[:, pos:pos + 1], q, key)
            else:
                logit = (q * key).sum(2, keepdim=True)
                if bias is not None:
                    logit = logit + bias[:, pos:pos + 1]
            logits.append(logit)
    # Softmax over the window on a 3-D view: PyTorch's CPU kernel is ~2x faster than on 5-D.
    attn = torch.cat(logits, dim=2).reshape(B * h, ks * ks, n * m).softmax(dim=1)
    attn = attn.reshape(B, h, ks * ks, n, m)
    out = None
    for pos in range(ks * ks):
        a, b = divmod(pos, ks)
        weight = attn[:, :, pos:pos + 1]
        out = weight * shift(v, a, b) if out is None else torch.addcmul(out, weight, shift(v, a, b))
    return out


def neighborhood_attention_2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    kernel_size: int,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Neighborhood attention on channels-first maps.

    Args:
        q, k, v: ``(B, C, H, W)`` with ``C = num_heads * head_dim``; channel ``c`` belongs to head
            ``c // head_dim``.
        num_heads: number of heads.
        kernel_size: odd window size ``k``, with ``k <= H`` and ``k <= W``.
        rpb: optional relative position bias ``(num_heads, 2k - 1, 2k - 1)``.
        scale: logit scale, ``head_dim ** -0.5`` by default.

    Returns:
        ``(B, C, H, W)``.
    """
    B, C, H, W = q.shape
    ks = kernel_size
    if ks % 2 != 1 or ks < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {ks}")
    if H < ks or W < ks:
        raise ValueError(
            f"neighborhood attention with kernel {ks} needs a map of at least {ks}x{ks}, got {H}x{W}"
        )
    if C % num_heads:
        raise ValueError(f"{C} channels do not split into {num_heads} heads")
    h, d, r = num_heads, C // num_heads, ks // 2
    scale = d ** -0.5 if scale is None else scale
    q = (q * scale).reshape(B, h, d, H, W)
    k = k.reshape(B, h, d, H, W)
    v = v.reshape(B, h, d, H, W)
    row_key, row_bias = neighborhood_window_index(H, ks, q.device)
    col_key, col_bias = neighborhood_window_index(W, ks, q.device)

    # Interior queries: rows [r, H - r), cols [r, W - r); key (i - r + a, j - r + b) is a view.
    hi, wi = H - 2 * r, W - 2 * r

    def centred(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return t[..., a:a + hi, b:b + wi]

    centre_bias = None if rpb is None else rpb[:, r:r + ks, r:r + ks].reshape(h, ks * ks, 1, 1)
    interior = _attend(q[..., r:H - r, r:W - r], k, v, centred, ks, centre_bias)
    if r == 0:
        return interior.reshape(B, C, H, W)

    def strip(rows: slice, cols: slice) -> torch.Tensor:
        rk, ck = row_key[rows], col_key[cols]

        def gathered(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
            # Narrow the shorter side first: a strip is k // 2 pixels wide.
            if rk.shape[0] <= ck.shape[0]:
                return t.index_select(3, rk[:, a]).index_select(4, ck[:, b])
            return t.index_select(4, ck[:, b]).index_select(3, rk[:, a])

        bias = None
        if rpb is not None:
            rb, cb = row_bias[rows], col_bias[cols]
            # bias[h, a, b, i, j] = rpb[h, rb[i, a], cb[j, b]]
            bias = rpb[:, rb.T[:, None, :, None], cb.T[None, :, None, :]]
            bias = bias.reshape(h, ks * ks, rb.shape[0], cb.shape[0])
        return _attend(q[..., rows, cols], k, v, gathered, ks, bias)

    top = strip(slice(0, r), slice(0, W))
    bottom = strip(slice(H - r, H), slice(0, W))
    left = strip(slice(r, H - r), slice(0, r))
    right = strip(slice(r, H - r), slice(W - r, W))
    middle = torch.cat([left, interior, right], dim=4)
    return torch.cat([top, middle, bottom], dim=3).reshape(B, C, H, W)


class NeighborhoodAttention2d(nn.Module):
    """Multi-head 2-D neighborhood attention on channels-last tokens ``(B, H, W, C)``.

    Args:
        dim: channels ``C``.
        num_heads: heads; ``C`` must be divisible by it.
        kernel_size: odd window size.
        bias: learn a relative position bias of shape ``(heads, 2k - 1, 2k - 1)``.
        proj_drop: dropout on the output.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, bias: bool = True,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.dim, self.num_heads, self.kernel_size = dim, num_heads, kernel_size
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rpb = (nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
                    if bias else None)
        if self.rpb is not None:
            nn.init.trunc_normal_(self.rpb, std=0.02)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: tokens ``(B, H, W, C)``; returns ``(B, H, W, C)``."""
        q, k, v = self.qkv(x).permute(0, 3, 1, 2).contiguous().chunk(3, dim=1)  # (B, C, H, W)
        out = neighborhood_attention_2d(q, k, v, self.num_heads, self.kernel_size, self.rpb,
                                        self.scale)
        return self.proj_drop(self.proj(out.permute(0, 2, 3, 1)))
