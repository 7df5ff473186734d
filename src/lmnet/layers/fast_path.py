"""Switching lmnet's fast training path on or off, for comparisons: :func:`fast_path`."""
from __future__ import annotations

import contextlib
from typing import Iterator

from lmnet.layers import depthwise, dropout, fused_norm, layer_norm, neighborhood_attention

__all__ = ["fast_path"]


@contextlib.contextmanager
def fast_path(enabled: bool = True) -> Iterator[None]:
    """Within the block, train with (``enabled``) or without lmnet's fast path: the hand-written
    backward of neighborhood attention (``neighborhood_attention.FAST_BACKWARD``) and its native
    forward and backward (``neighborhood_attention.NATIVE_TRAINING``), the native
    BatchNorm kernel (``fused_norm.NATIVE``) and the native weight gradient of the larger
    depthwise convolutions (``depthwise.NATIVE``), the hashed-mask dropout (``dropout.NATIVE``;
    the same mathematics, other random numbers), the native LayerNorm (``layer_norm.NATIVE``),
    and outside autograd the native attention kernel
    (``neighborhood_attention.NATIVE_FORWARD``). Without it, training computes as PyTorch's own
    modules do (lmnet at b5568b3): the reference the tests and ``benchmarks/bench_train_fast.py``
    compare against. Not thread-safe: it sets module-wide switches."""
    na = neighborhood_attention
    before = (na.FAST_BACKWARD, na.NATIVE_FORWARD, na.NATIVE_TRAINING, fused_norm.NATIVE,
              depthwise.NATIVE, dropout.NATIVE, layer_norm.NATIVE)
    na.FAST_BACKWARD = na.NATIVE_FORWARD = na.NATIVE_TRAINING = enabled
    fused_norm.NATIVE = depthwise.NATIVE = dropout.NATIVE = layer_norm.NATIVE = enabled
    try:
        yield
    finally:
        (na.FAST_BACKWARD, na.NATIVE_FORWARD, na.NATIVE_TRAINING, fused_norm.NATIVE,
         depthwise.NATIVE, dropout.NATIVE, layer_norm.NATIVE) = before
