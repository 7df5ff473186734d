"""Inference precisions: fp32, bf16 autocast, fp16 autocast (CUDA only)."""
from __future__ import annotations

import pytest
import torch

from lmnet.deploy.backends import PRECISIONS, precision_context


def test_bf16_autocast_runs_convolutions_in_bf16_on_cpu():
    conv = torch.nn.Conv2d(3, 4, 3)
    with precision_context("bf16", "cpu"):
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16
    with precision_context("fp32", "cpu"):
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.float32


def test_fp16_on_cpu_is_a_clear_error():
    assert "fp16" in PRECISIONS
    with pytest.raises(ValueError, match="CUDA"):
        precision_context("fp16", "cpu")
    with pytest.raises(ValueError, match="one of"):
        precision_context("int4", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs a CUDA GPU")
def test_fp16_autocast_on_cuda():
    conv = torch.nn.Conv2d(3, 4, 3).cuda()
    with precision_context("fp16", "cuda"):
        assert conv(torch.randn(1, 3, 8, 8, device="cuda")).dtype == torch.float16
