"""lmnet.runtime: keeping freed memory in the process (no page-fault storm per forward pass)."""
from __future__ import annotations

import resource
import sys

import pytest
import torch

from lmnet.runtime import keep_freed_memory


def test_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LMNET_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_freed_blocks_are_reused_without_page_faults():
    assert keep_freed_memory() is True
    def churn() -> None:  # allocate, touch and free 48 MiB five times
        for _ in range(5):
            torch.empty(12 << 20).fill_(1.0)
    for _ in range(3):  # the heap grows to hold the block first
        churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # With glibc's defaults a block over 32 MiB is always a fresh mmap: 12,288 faults per block.
    assert faults < 1000, faults
