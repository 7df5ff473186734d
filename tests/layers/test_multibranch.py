"""Multi-branch module: structure, branch parsing, exact re-parameterisation."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmnet.layers import MultiBranchBlock, parse_branches
from tests.conftest import randomize_batchnorm


def block_params(c_in: int, c_exp: int, c_out: int, taps: int) -> int:
    """Hand count of MB(c_in, c_exp, c_out) with ``taps`` depthwise weights per channel."""
    expand = c_in * c_exp + c_exp + 2 * c_exp
    branches = taps * c_exp
    se = c_exp * (c_exp // 4) + c_exp // 4 + (c_exp // 4) * c_exp + c_exp
    return expand + branches + se + c_exp * c_out + c_out + c_in * c_out + c_out


def test_parameter_count_matches_hand_count():
    block = MultiBranchBlock(3, 24, 12)
    n_bn = 4 * 2 * 24
    assert sum(p.numel() for p in block.parameters()) == block_params(3, 24, 12, 25 + 9 + 3 + 3) + n_bn


@pytest.mark.parametrize("branches", [
    ("5x5", "3x3", "3x1", "1x3"), ("3x3",), ("7x7", "1x3"), ("5x5d2", "3x3"), ("1x3", "3x1"),
    ("5x5", "3x3", "3x1", "1x3", "5x5d2", "7x7"),
])
def test_reparameterize_is_exact(branches):
    block = randomize_batchnorm(MultiBranchBlock(6, 16, 8, branches)).eval()
    x = torch.randn(2, 6, 13, 10)
    with torch.no_grad():
        ref = block(x)
        fused = copy.deepcopy(block)
        fused.reparameterize()
        out = fused(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    extent = [s.extent for s in parse_branches(branches)]
    assert fused.fused.kernel_size == (max(e[0] for e in extent), max(e[1] for e in extent))
    assert fused.fused.bias is not None and fused.fused.groups == 16


def test_reparameterize_removes_branches_and_is_idempotent():
    block = randomize_batchnorm(MultiBranchBlock(4, 8, 4)).eval()
    block.reparameterize()
    assert len(block.branches) == 0 and block.deployed
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    state = {k: v.clone() for k, v in block.state_dict().items()}
    block.reparameterize()
    assert block.state_dict().keys() == state.keys()
    for k, v in block.state_dict().items():
        assert torch.equal(v, state[k])


def test_trained_statistics_reparameterize_exactly():
    # Real BatchNorm statistics from a few optimisation steps, not only random ones.
    block = MultiBranchBlock(3, 12, 6)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    for _ in range(5):
        loss = block(torch.randn(4, 3, 16, 16) * 3 + 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    block.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = block(x)
        block.reparameterize()
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("bad,match", [
    ([], "at least one"), (["4x4"], "odd"), (["3x3", "3x3"], "duplicate"), (["3by3"], "unknown"),
])
def test_bad_branch_sets_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_branches(bad)


def test_branch_aliases():
    assert parse_branches("d5x5,3x3") == parse_branches(["5x5d2", "3x3"])
    assert parse_branches(["5x5d2"])[0].extent == (9, 9)
