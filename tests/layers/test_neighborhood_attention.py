"""Neighborhood attention against a slow loop reference, gradients, ONNX export."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmnet.layers import (
    NeighborhoodAttention2d,
    neighborhood_attention_2d,
    neighborhood_window_index,
)


def cf(t):
    """(B, H, W, C) -> (B, C, H, W)."""
    return t.permute(0, 3, 1, 2)


def na_loop_reference(q, k, v, heads, ksize, rpb=None, scale=None):
    """Obviously-correct NAT semantics, one query at a time, on (B, H, W, C) tokens."""
    B, H, W, C = q.shape
    d = C // heads
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    r = ksize // 2
    for b in range(B):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            for i in range(H):
                si = min(max(i - r, 0), H - ksize)
                for j in range(W):
                    sj = min(max(j - r, 0), W - ksize)
                    logits, values = [], []
                    for ki in range(si, si + ksize):
                        for kj in range(sj, sj + ksize):
                            lg = scale * torch.dot(q[b, i, j, sl], k[b, ki, kj, sl])
                            if rpb is not None:
                                lg = lg + rpb[h, ki - i + ksize - 1, kj - j + ksize - 1]
                            logits.append(lg)
                            values.append(v[b, ki, kj, sl])
                    w = torch.softmax(torch.stack(logits), 0)
                    out[b, i, j, sl] = (w[:, None] * torch.stack(values)).sum(0)
    return out


def test_window_index_is_clamped_at_borders():
    key, bias = neighborhood_window_index(6, 3)
    assert key[0].tolist() == [0, 1, 2]        # first query: window shifted inwards
    assert key[3].tolist() == [2, 3, 4]        # interior: centred
    assert key[5].tolist() == [3, 4, 5]        # last query: shifted inwards
    assert bias[0].tolist() == [2, 3, 4]       # true offsets 0, 1, 2 -> index offset + k - 1
    assert bias[5].tolist() == [0, 1, 2]       # true offsets -2, -1, 0
    assert int(bias.min()) >= 0 and int(bias.max()) <= 4


@pytest.mark.parametrize(
    "shape,heads,ksize",
    [((1, 7, 7, 4), 2, 3), ((2, 5, 9, 6), 3, 3), ((1, 8, 6, 4), 1, 5), ((1, 7, 9, 2), 2, 7),
     ((1, 3, 3, 4), 4, 3), ((1, 5, 4, 8), 2, 3)],
)
def test_matches_loop_reference(shape, heads, ksize):
    q, k, v = (torch.randn(shape) for _ in range(3))
    rpb = torch.randn(heads, 2 * ksize - 1, 2 * ksize - 1)
    for bias in (None, rpb):
        ours = neighborhood_attention_2d(cf(q), cf(k), cf(v), heads, ksize, bias)
        ref = cf(na_loop_reference(q, k, v, heads, ksize, bias))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_custom_scale_matches_reference():
    q, k, v = (torch.randn(1, 5, 6, 4) for _ in range(3))
    ours = neighborhood_attention_2d(cf(q), cf(k), cf(v), 2, 3, scale=0.3)
    torch.testing.assert_close(ours, cf(na_loop_reference(q, k, v, 2, 3, scale=0.3)))


def test_kernel_equal_to_map_is_global_attention():
    # With k == H == W every query sees every key: plain softmax attention plus bias.
    q, k, v = (torch.randn(1, 3, 3, 2) for _ in range(3))
    ours = neighborhood_attention_2d(cf(q), cf(k), cf(v), 1, 3).permute(0, 2, 3, 1)
    logits = (q.reshape(9, 2) @ k.reshape(9, 2).T) / math.sqrt(2)
    dense = (logits.softmax(-1) @ v.reshape(9, 2)).reshape(1, 3, 3, 2)
    torch.testing.assert_close(ours, dense)


def test_module_matches_reference_with_its_own_projections():
    m = NeighborhoodAttention2d(8, 4, 3)
    with torch.no_grad():
        m.rpb.normal_()
    x = torch.randn(2, 6, 5, 8)
    q, k, v = m.qkv(x).chunk(3, dim=-1)
    ref = m.proj(na_loop_reference(q, k, v, 4, 3, m.rpb))
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_gradients_match_finite_differences():
    shape = (1, 4, 5, 4)
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c, r: neighborhood_attention_2d(a, b, c, 2, 3, r), (q, k, v, rpb))


def test_gradients_reach_every_parameter():
    m = NeighborhoodAttention2d(8, 4, 3)
    m(torch.randn(2, 6, 7, 8)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("shape", [(1, 4, 2, 5), (1, 4, 5, 2)])
def test_map_smaller_than_kernel_is_a_clear_error(shape):
    q = torch.randn(shape)
    with pytest.raises(ValueError, match="at least 3x3"):
        neighborhood_attention_2d(q, q, q, 2, 3)


def test_even_kernel_and_bad_heads_are_rejected():
    with pytest.raises(ValueError, match="odd"):
        NeighborhoodAttention2d(8, 2, 4)
    with pytest.raises(ValueError, match="divisible"):
        NeighborhoodAttention2d(10, 4, 3)


@pytest.mark.slow
def test_onnx_export_matches_pytorch(tmp_path):
    import onnxruntime as ort
    m = NeighborhoodAttention2d(24, 12, 3).eval()
    with torch.no_grad():
        m.rpb.normal_()
    x = torch.randn(2, 9, 11, 24)
    path = tmp_path / "na.onnx"
    dims = {0: torch.export.Dim("b", min=1, max=64), 1: torch.export.Dim("h", min=3, max=4096),
            2: torch.export.Dim("w", min=3, max=4096)}
    torch.onnx.export(m, (x,), path, dynamo=True, opset_version=18, dynamic_shapes={"x": dims},
                      input_names=["x"], output_names=["y"], verbose=False)
    import onnx

    model = onnx.load(path)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 9, 11, 24), (1, 3, 5, 24), (3, 16, 12, 24)]:  # other sizes than traced
        xx = torch.randn(*shape)
        with torch.no_grad():
            ref = m(xx).numpy()
        out = sess.run(None, {"x": xx.numpy()})[0]
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_border_indices_are_cached_per_size():
    # The flat border indices are cached by (H, W, k): alternating sizes must not mix them up.
    rpb = torch.randn(2, 5, 5)
    for shape in [(1, 6, 7, 4), (1, 9, 5, 4), (1, 6, 7, 4)]:
        q, k, v = (torch.randn(shape) for _ in range(3))
        ours = neighborhood_attention_2d(cf(q), cf(k), cf(v), 2, 3, rpb)
        torch.testing.assert_close(ours, cf(na_loop_reference(q, k, v, 2, 3, rpb)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    # Inductor once failed on the border gather ("vr must not be None"); the indices are now
    # computed outside the compiled graph.
    q, k, v = (torch.randn(1, 6, 7, 4) for _ in range(3))
    rpb = torch.randn(2, 5, 5)
    fn = torch.compile(neighborhood_attention_2d, dynamic=False)
    torch.testing.assert_close(fn(cf(q), cf(k), cf(v), 2, 3, rpb),
                               neighborhood_attention_2d(cf(q), cf(k), cf(v), 2, 3, rpb))


def test_training_after_inference_at_the_same_size():
    # The cached indices must not be inference tensors: autograd saves them for backward.
    m = NeighborhoodAttention2d(8, 4, 3)
    x = torch.randn(1, 11, 13, 8)
    with torch.inference_mode():
        m(x)
    m(x).sum().backward()
    assert m.qkv.weight.grad.abs().sum() > 0
