"""2-D neighborhood attention (Hassani et al., NAT) in plain PyTorch, no CUDA extension.

Semantics (as NATTEN, dilation 1): every query attends to exactly ``k x k`` keys. The window of a
query at row ``i`` spans rows ``[s, s + k)`` with ``s = clamp(i - k // 2, 0, H - k)``: near a border
the window is shifted inwards instead of zero-padded. The relative position bias, a table of shape
``(heads, 2k - 1, 2k - 1)``, is indexed by the true offset ``key - query + k - 1`` of each key.

How it is computed (channels-first maps ``(B, C, H, W)``, ``C = heads * head_dim``): the queries are
split into the interior, whose windows are centred, and the border, a frame ``k // 2`` pixels wide.
For the interior, window position ``(a, b)`` of every query is one strided *view* of the key map
(no copy) and the bias is one number per head and position. The border queries (a small share of
the map) are computed together: one gather of their keys, values and biases by precomputed flat
indices, one softmax. Every step is a whole-map tensor op (about 33 of them, whatever the map size),
so the memory use is a few copies of the map, autograd works, and the graph exports to ONNX with
dynamic batch and spatial size.

On float32 CPU maps the same mathematics runs as native kernels where lmnet's native library
loads (``layers/_native/neighborhood_attention.cpp``: one pass over the map instead of the
whole-map operations above; equal to them within float rounding, tests compare the two): outside
autograd (inference, validation) ``neighborhood_attention_forward``, and in training the same
forward with ``neighborhood_attention_backward`` (:class:`_NativeAttention`), which recomputes the
window weights instead of keeping them. In training, :class:`NeighborhoodAttention2d` also
computes its projections as batched matrix products on the tokens' own layout, so that the
kernels read q, k and v in place from one channels-first qkv map and return its gradient as one
tensor (no permuted copies). :class:`NeighborhoodAttentionCore` is the module around it that
the OpenVINO engine replaces by the forward kernel (``lmnet.deploy.openvino_ops``).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from lmnet.layers.dropout import Dropout
from lmnet.layers.native import (fp32_backward, fp32_forward, in_plain_eager, kernel_dtype,
                                 native_ops)

__all__ = ["neighborhood_window_index", "neighborhood_attention_2d", "NeighborhoodAttention2d",
           "NeighborhoodAttentionCore", "native_forward_applies", "native_training_applies",
           "FAST_BACKWARD", "NATIVE_FORWARD", "NATIVE_TRAINING"]

#: Train with :class:`_InteriorAttention`'s hand-written backward (the same mathematics as
#: autograd's, several times faster on a CPU). False: autograd's own, as lmnet did before; for
#: comparisons (``benchmarks/bench_train_fast.py``, the tests).
FAST_BACKWARD = True

#: Outside autograd, compute with the native kernel where it applies
#: (:func:`native_forward_applies`). False: the whole-map PyTorch operations, as lmnet did before.
NATIVE_FORWARD = True

#: Under autograd, compute forward and backward with the native kernels where they apply
#: (:func:`native_training_applies`). False: the PyTorch formulation (with :data:`FAST_BACKWARD`'s
#: hand-written backward of the interior), as lmnet did before; for comparisons.
NATIVE_TRAINING = True

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


def _window_softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over the window axis ``dim`` (not the last one).

    Exported to ONNX as ReduceMax, Sub, Exp, ReduceSum, Div: ONNX Runtime runs its Softmax on an
    inner axis by transposing the tensor there and back (``docs/architecture.md``).
    """
    if torch.onnx.is_in_onnx_export():
        e = (logits - logits.amax(dim, keepdim=True)).exp()
        return e / e.sum(dim, keepdim=True)
    return logits.softmax(dim)


def _attend_interior(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ks: int,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """Attention of the interior queries ``q (B, h, d, H - 2r, W - 2r)`` over their centred windows.

    Window position ``(a, b)`` of every interior query is the strided view
    ``k[..., a:a + H - 2r, b:b + W - 2r]`` of the whole key map ``k (B, h, d, H, W)`` (no copy);
    ``bias`` is ``(h, ks * ks, 1, 1)``.

    When autograd records the call (training, not export or compilation), the backward pass is
    :class:`_InteriorAttention`'s, written out by hand: autograd's own backward of the ``ks * ks``
    window views allocates and zero-fills a whole-map gradient for every view (for the 3 x 3
    window at 256 x 256, batch 8, nine 223 MB fills: 40 % of a training step on a CPU). The
    forward pass is the same either way.
    """
    if (FAST_BACKWARD and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (q, k, v, bias))
            and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()
            and not torch.compiler.is_compiling()):
        return _InteriorAttention.apply(q, k, v, bias, ks)
    return _interior_forward(q, k, v, ks, bias)[0]


def _interior_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ks: int,
                      bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The output of :func:`_attend_interior` and its attention weights ``(B, h, ks * ks, n, m)``."""
    B, h, d, n, m = q.shape
    logits = []
    for a in range(ks):
        for b in range(ks):
            key = k[..., a:a + n, b:b + m]
            pos = a * ks + b
            if d == 1:  # one channel per head: the product is the logit
                logit = q * key if bias is None else torch.addcmul(bias[:, pos:pos + 1], q, key)
            else:
                logit = (q * key).sum(2, keepdim=True)
                if bias is not None:
                    logit = logit + bias[:, pos:pos + 1]
            logits.append(logit)
    # Softmax over the window on a 3-D view: PyTorch's CPU kernel is ~2x faster than on 5-D.
    attn = _window_softmax(torch.cat(logits, dim=2).reshape(B * h, ks * ks, n * m), 1)
    attn = attn.reshape(B, h, ks * ks, n, m)
    out = None
    for pos in range(ks * ks):
        a, b = divmod(pos, ks)
        weight, value = attn[:, :, pos:pos + 1], v[..., a:a + n, b:b + m]
        out = weight * value if out is None else torch.addcmul(out, weight, value)
    return out, attn


class _InteriorAttention(torch.autograd.Function):
    """:func:`_interior_forward` with its backward written out: every window view's gradient is
    added in place into one gradient map per input (one zero-fill each), where autograd would
    build a zero-filled whole map per view and sum them. The same mathematics (the softmax's
    backward is ``attn * (dattn - sum(attn * dattn))``), in another summation order."""

    @staticmethod
    def forward(ctx, q, k, v, bias, ks):  # noqa: ANN001, ANN205 - autograd.Function signature
        out, attn = _interior_forward(q, k, v, ks, bias)
        ctx.save_for_backward(q, k, v, attn)
        ctx.ks, ctx.has_bias = ks, bias is not None
        ctx.bias_shape = None if bias is None else bias.shape
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - autograd.Function signature
        q, k, v, attn = ctx.saved_tensors
        ks = ctx.ks
        n, m = q.shape[-2:]
        d = q.shape[2]
        windows = [(a, b) for a in range(ks) for b in range(ks)]
        grad = grad.contiguous()
        # d out / d attn and d out / d v, window position by window position
        weights = attn.unbind(2)  # (B, h, n, m) views, one per window position
        dattn = []
        grad_v = torch.zeros_like(v) if ctx.needs_input_grad[2] else None
        for pos, (a, b) in enumerate(windows):
            value = v[..., a:a + n, b:b + m]
            dattn.append(grad * value if d == 1 else (grad * value).sum(2, keepdim=True))
            if grad_v is not None:
                grad_v[..., a:a + n, b:b + m].addcmul_(weights[pos][:, :, None], grad)
        # softmax over the window: d logits = attn * (d attn - sum over the window of attn * d attn)
        dot = weights[0][:, :, None] * dattn[0]
        for pos in range(1, len(windows)):
            dot.addcmul_(weights[pos][:, :, None], dattn[pos])
        grad_q = torch.zeros_like(q) if ctx.needs_input_grad[0] else None
        grad_k = torch.zeros_like(k) if ctx.needs_input_grad[1] else None
        bias_grads = []
        for pos, (a, b) in enumerate(windows):
            dl = dattn[pos].sub_(dot).mul_(weights[pos][:, :, None])  # d logit of this position
            if grad_q is not None:
                grad_q.addcmul_(dl, k[..., a:a + n, b:b + m])
            if grad_k is not None:
                grad_k[..., a:a + n, b:b + m].addcmul_(dl, q)
            if ctx.has_bias and ctx.needs_input_grad[3]:
                bias_grads.append(dl.sum((0, 2, 3, 4)))
            dattn[pos] = None  # freed as soon as it is used
        grad_bias = (torch.stack(bias_grads, 1).reshape(ctx.bias_shape) if bias_grads else None)
        return grad_q, grad_k, grad_v, grad_bias, None


def _border_index(H: int, W: int, ks: int, device: torch.device | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices for the ``N = 2r(H + W - 2r)`` border queries, ``r = ks // 2``.

    Order: top rows ``(r, W)``, bottom rows ``(r, W)``, left columns ``(H - 2r, r)``, right
    columns ``(H - 2r, r)``, each row-major. Returns ``query (N,)`` into ``H * W``,
    ``key (ks * ks, N)`` into ``H * W`` and ``bias (ks * ks, N)`` into the flattened
    ``(2ks - 1) ** 2`` bias table.
    """
    r = ks // 2
    row_key, row_bias = neighborhood_window_index(H, ks, device)
    col_key, col_bias = neighborhood_window_index(W, ks, device)
    rows_all, cols_all = torch.arange(H, device=device), torch.arange(W, device=device)
    parts = [(rows_all[:r], cols_all), (rows_all[H - r:], cols_all),
             (rows_all[r:H - r], cols_all[:r]), (rows_all[r:H - r], cols_all[W - r:])]
    rows = torch.cat([i[:, None].expand(-1, j.shape[0]).reshape(-1) for i, j in parts])
    cols = torch.cat([j[None, :].expand(i.shape[0], -1).reshape(-1) for i, j in parts])
    # (N, ks, 1) and (N, 1, ks) -> (N, ks, ks) -> (ks * ks, N)
    key = row_key[rows][:, :, None] * W + col_key[cols][:, None, :]
    bias = row_bias[rows][:, :, None] * (2 * ks - 1) + col_bias[cols][:, None, :]
    return rows * W + cols, key.reshape(-1, ks * ks).T, bias.reshape(-1, ks * ks).T


@functools.lru_cache(maxsize=32)
def _border_index_cached(H: int, W: int, ks: int, device: torch.device | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_border_index`, cached per size."""
    # Normal tensors even when first asked for under inference_mode: autograd saves them later.
    with torch.inference_mode(False):
        return _border_index(H, W, ks, device)


@functools.cache
def _border_index_outside_compile():  # noqa: ANN202
    """:func:`_border_index_cached` kept out of compiled graphs (Inductor failed on it inside).
    Wrapped on first use: ``torch.compiler.disable`` imports TorchDynamo, 2 s of every start-up."""
    return torch.compiler.disable(_border_index_cached)


def _attend_border(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ks: int,
                   rpb: torch.Tensor | None) -> torch.Tensor:
    """Attention of the border queries of ``q, k, v (B, h, d, H, W)``: one gathered computation.

    Returns ``(B, h, d, N)`` in the order of :func:`_border_index`.
    """
    B, h, d, H, W = q.shape
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        index = _border_index(H, W, ks, q.device)  # traced: follows the input's size
    elif torch.compiler.is_compiling():
        index = _border_index_outside_compile()(H, W, ks, q.device)
    else:
        index = _border_index_cached(H, W, ks, q.device)
    q_idx, k_idx, b_idx = index
    N, flat_k = q_idx.shape[0], k_idx.reshape(-1)

    def windows(t: torch.Tensor) -> torch.Tensor:  # (B, h, d, H, W) -> (B, h, d, ks * ks, N)
        return t.flatten(3).index_select(3, flat_k).reshape(B, h, d, ks * ks, N)

    qb = q.flatten(3).index_select(3, q_idx)[:, :, :, None]  # (B, h, d, 1, N)
    if d == 1:
        logits = (qb * windows(k))[:, :, 0]
    else:
        logits = (qb * windows(k)).sum(2)  # (B, h, ks * ks, N)
    if rpb is not None:
        logits = logits + rpb.flatten(1).index_select(1, b_idx.reshape(-1)).reshape(h, ks * ks, N)
    attn = _window_softmax(logits, 2)[:, :, None]  # (B, h, 1, ks * ks, N)
    return (attn * windows(v)).sum(3)


def native_forward_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           rpb: torch.Tensor | None) -> bool:
    """Whether :func:`neighborhood_attention_2d` runs the native kernel on these inputs: float32
    CPU maps (or, under bf16 autocast, bf16 ones: computed in float32, as in training), nothing
    that autograd records, outside tracing, export and compilation, the native library loaded."""
    tensors = (q, k, v) if rpb is None else (q, k, v, rpb)
    return (NATIVE_FORWARD
            and all(t.device.type == "cpu" for t in tensors) and kernel_dtype(*tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()
            and not torch.compiler.is_compiling()
            and native_ops(build=False) is not None)


def native_training_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            rpb: torch.Tensor | None) -> bool:
    """Whether :func:`neighborhood_attention_2d` trains with the native kernels on these inputs:
    float32 CPU maps that autograd records, in plain eager PyTorch (not traced, exported or
    compiled), the native library built (training builds it on first use)."""
    return _trains_natively_on([t for t in (q, k, v, rpb) if t is not None])


def _trains_natively_on(tensors: list[torch.Tensor]) -> bool:
    """The native training kernels' conditions on the tensors a call computes with."""
    return (NATIVE_TRAINING and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and all(t.device.type == "cpu" for t in tensors) and kernel_dtype(*tensors)
            and in_plain_eager() and native_ops() is not None)


class _NativeAttention(torch.autograd.Function):
    """The native forward and backward; the backward recomputes the window weights from ``q`` and
    ``k`` (one pass over a row of queries) instead of keeping a ``ks * ks`` map per head."""

    @staticmethod
    @fp32_forward
    def forward(ctx, q, k, v, rpb, heads, ks, scale):  # noqa: ANN001, ANN205 - autograd.Function
        ctx.save_for_backward(q, k, v, rpb)
        ctx.args = (heads, ks, scale)
        return native_ops().neighborhood_attention_forward(q, k, v, rpb, heads, ks, scale)

    @staticmethod
    @fp32_backward
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - autograd.Function signature
        q, k, v, rpb = ctx.saved_tensors
        ops = native_ops()
        dq, dk, dv, drpb, _ = ops.neighborhood_attention_backward(grad, q, k, v, rpb, *ctx.args)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                drpb if rpb is not None and need[3] else None, None, None, None)


class _NativeAttentionQKV(torch.autograd.Function):
    """:class:`_NativeAttention` on one channels-first ``qkv`` map ``(B, 3C, H, W)``: the kernels
    read q, k and v as its channel slices in place and write its gradient as one tensor (no
    split, no concatenation of the three gradients)."""

    @staticmethod
    @fp32_forward
    def forward(ctx, qkv, rpb, heads, ks, scale):  # noqa: ANN001, ANN205 - autograd.Function
        ctx.save_for_backward(qkv, rpb)
        ctx.args = (heads, ks, scale)
        q, k, v = qkv.chunk(3, dim=1)
        return native_ops().neighborhood_attention_forward(q, k, v, rpb, heads, ks, scale)

    @staticmethod
    @fp32_backward
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - autograd.Function signature
        qkv, rpb = ctx.saved_tensors
        q, k, v = qkv.chunk(3, dim=1)
        *_, drpb, dqkv = native_ops().neighborhood_attention_backward(grad, q, k, v, rpb,
                                                                     *ctx.args, True)
        need = ctx.needs_input_grad
        return (dqkv if need[0] else None, drpb if rpb is not None and need[1] else None,
                None, None, None)


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
    if native_forward_applies(q, k, v, rpb):
        # bf16 under autocast: the kernel computes in float32 (.float() of float32 is a no-op)
        rpb32 = None if rpb is None else rpb.float()
        return native_ops().neighborhood_attention_forward(q.float(), k.float(), v.float(), rpb32,
                                                           h, ks, float(scale))
    if native_training_applies(q, k, v, rpb):
        return _NativeAttention.apply(q, k, v, rpb, h, ks, float(scale))
    q = (q * scale).reshape(B, h, d, H, W)
    k = k.reshape(B, h, d, H, W)
    v = v.reshape(B, h, d, H, W)

    # Interior queries: rows [r, H - r), cols [r, W - r); their windows are centred.
    centre_bias = None if rpb is None else rpb[:, r:r + ks, r:r + ks].reshape(h, ks * ks, 1, 1)
    interior = _attend_interior(q[..., r:H - r, r:W - r], k, v, ks, centre_bias)
    if r == 0:
        return interior.reshape(B, C, H, W)

    border = _attend_border(q, k, v, ks, rpb)  # (B, h, d, N)
    n_rows, n_cols = r * W, (H - 2 * r) * r
    top, bottom, left, right = border.split([n_rows, n_rows, n_cols, n_cols], dim=3)
    middle = torch.cat([left.reshape(B, h, d, H - 2 * r, r), interior,
                        right.reshape(B, h, d, H - 2 * r, r)], dim=4)
    return torch.cat([top.reshape(B, h, d, r, W), middle, bottom.reshape(B, h, d, r, W)],
                     dim=3).reshape(B, C, H, W)


class NeighborhoodAttentionCore(nn.Module):
    """:func:`neighborhood_attention_2d` as a module without parameters: ``forward(q, k, v, rpb)``
    on channels-first maps. A module so that a converter can replace it as a whole (the OpenVINO
    engine, ``lmnet.deploy.openvino_ops``); it adds nothing to a state dict."""

    def __init__(self, num_heads: int, kernel_size: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.kernel_size, self.scale = num_heads, kernel_size, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rpb: torch.Tensor | None) -> torch.Tensor:
        return neighborhood_attention_2d(q, k, v, self.num_heads, self.kernel_size, rpb, self.scale)


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
        self.proj_drop = Dropout(proj_drop)
        self.core = NeighborhoodAttentionCore(num_heads, kernel_size, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: tokens ``(B, H, W, C)``; returns ``(B, H, W, C)``."""
        if self._trains_natively(x):
            return self.proj_drop(self._native_training_forward(x))
        q, k, v = self.qkv(x).permute(0, 3, 1, 2).contiguous().chunk(3, dim=1)  # (B, C, H, W)
        out = self.core(q, k, v, self.rpb)
        return self.proj_drop(self.proj(out.permute(0, 2, 3, 1)))

    def _trains_natively(self, x: torch.Tensor) -> bool:
        """Whether training takes :meth:`_native_training_forward` (the native kernels'
        conditions, as :func:`native_training_applies`, for the input and the parameters)."""
        params = [p for p in (self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias,
                              self.rpb) if p is not None]
        return (x.dim() == 4 and x.shape[-1] == self.dim and _trains_natively_on([x, *params]))

    def _native_training_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same projections as ``forward``'s as batched matrix products on the tokens' own
        layout: ``qkv`` comes out channels-first ``(B, 3C, H * W)`` for the kernels and the
        output projection reads their ``(B, C, H * W)`` result transposed, so that no map is
        permuted into a copy (about 0.1 s of a training step at 256 x 256, batch 8)."""
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        w, b = self.qkv.weight, self.qkv.bias
        qkv = torch.baddbmm(b.view(1, -1, 1), w.expand(B, -1, -1), tokens.transpose(1, 2))
        out = _NativeAttentionQKV.apply(qkv.view(B, 3 * C, H, W), self.rpb, self.num_heads,
                                        self.kernel_size, float(self.scale))
        w, b = self.proj.weight, self.proj.bias
        y = torch.baddbmm(b.view(1, 1, -1), out.view(B, C, H * W).transpose(1, 2),
                          w.t().expand(B, -1, -1))
        return y.view(B, H, W, C)
