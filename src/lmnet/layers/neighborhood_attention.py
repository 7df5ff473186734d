"""2-D neighborhood attention (Hassani et al., NAT) in plain PyTorch, no CUDA extension.

Semantics (as NATTEN, dilation 1): every query attends to exactly ``k x k`` keys. The window of a
query at row ``i`` spans rows ``[s, s + k)`` with ``s = clamp(i - k // 2, 0, H - k)``: near a border
the window is shifted inwards instead of zero-padded. The relative position bias, a table of shape
``(heads, 2k - 1, 2k - 1)``, is indexed by the true offset ``key - query + k - 1`` of each key.

The implementation works on channels-last maps ``(B, H, W, C)`` with ``C = heads * head_dim`` and
loops over the ``k * k`` window positions: each position is one ``index_select`` per axis, so the
memory use is that of a few copies of the map and the graph exports to ONNX (Gather, Mul, ReduceSum,
Softmax).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["neighborhood_window_index", "neighborhood_attention_2d", "NeighborhoodAttention2d"]


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


def neighborhood_attention_2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    kernel_size: int,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Neighborhood attention on channels-last maps.

    Args:
        q, k, v: ``(B, H, W, C)`` with ``C = num_heads * head_dim``.
        num_heads: number of heads.
        kernel_size: odd window size ``k``, with ``k <= H`` and ``k <= W``.
        rpb: optional relative position bias ``(num_heads, 2k - 1, 2k - 1)``.
        scale: logit scale, ``head_dim ** -0.5`` by default.

    Returns:
        ``(B, H, W, C)``.
    """
    B, H, W, C = q.shape
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if H < kernel_size or W < kernel_size:
        raise ValueError(
            f"neighborhood attention with kernel {kernel_size} needs a map of at least "
            f"{kernel_size}x{kernel_size}, got {H}x{W}"
        )
    if C % num_heads:
        raise ValueError(f"{C} channels do not split into {num_heads} heads")
    d = C // num_heads
    scale = d ** -0.5 if scale is None else scale
    row_key, row_bias = neighborhood_window_index(H, kernel_size, q.device)
    col_key, col_bias = neighborhood_window_index(W, kernel_size, q.device)
    q = q * scale

    logits = []
    for a in range(kernel_size):
        k_rows = k.index_select(1, row_key[:, a])
        for b in range(kernel_size):
            k_ab = k_rows.index_select(2, col_key[:, b])
            logits.append((q * k_ab).reshape(B, H, W, num_heads, d).sum(-1))
    attn = torch.stack(logits, dim=-1)  # (B, H, W, heads, k*k)
    if rpb is not None:
        # bias[h, i, j, a, b] = rpb[h, row_bias[i, a], col_bias[j, b]]
        bias = rpb[:, row_bias[:, None, :, None], col_bias[None, :, None, :]]
        attn = attn + bias.permute(1, 2, 0, 3, 4).reshape(H, W, num_heads, -1)
    attn = attn.softmax(dim=-1)

    out = None
    n = 0
    for a in range(kernel_size):
        v_rows = v.index_select(1, row_key[:, a])
        for b in range(kernel_size):
            v_ab = v_rows.index_select(2, col_key[:, b]).reshape(B, H, W, num_heads, d)
            term = attn[..., n:n + 1] * v_ab
            out = term if out is None else out + term
            n += 1
    return out.reshape(B, H, W, C)


class NeighborhoodAttention2d(nn.Module):
    """Multi-head 2-D neighborhood attention on ``(B, H, W, C)`` tokens.

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
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = neighborhood_attention_2d(q, k, v, self.num_heads, self.kernel_size, self.rpb,
                                        self.scale)
        return self.proj_drop(self.proj(out))
