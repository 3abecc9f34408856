from __future__ import annotations

import pytest
import torch

from sawkv.quant.hadamard import (
    block_hadamard_matrix,
    hadamard_matrix,
    rotate,
    rotate_matmul,
    valid_had_blocks,
)


@pytest.mark.parametrize("n", [16, 32, 64, 128, 256])
def test_hadamard_is_orthogonal_and_symmetric(n):
    h = hadamard_matrix(n, torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(h, h.T)
    # entries are +-1/sqrt(n): a rotation that spreads one channel evenly over the block
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


@pytest.mark.parametrize(
    "head_dim,had_block",
    [(64, 16), (64, 32), (64, 64), (128, 128), (128, 32), (256, 256), (256, 64)],
)
def test_fast_transform_equals_matrix(head_dim, had_block):
    x = torch.randn(5, 3, head_dim, dtype=torch.float64)
    r = block_hadamard_matrix(head_dim, had_block, torch.float64)
    expected = x @ r.T
    torch.testing.assert_close(rotate(x, had_block), expected)
    torch.testing.assert_close(rotate_matmul(x, had_block), expected)
    # R is its own inverse, and it preserves dot products (q.k == Rq.Rk)
    torch.testing.assert_close(rotate(rotate(x, had_block), had_block), x)
    q = torch.randn(head_dim, dtype=torch.float64)
    torch.testing.assert_close(
        (rotate(x, had_block) * rotate(q, had_block)).sum(-1), (x * q).sum(-1)
    )


def test_block_diagonal_structure():
    r = block_hadamard_matrix(64, 16)
    assert torch.count_nonzero(r[:16, 16:]) == 0
    assert torch.count_nonzero(r[16:32, :16]) == 0


def test_outlier_is_spread_over_its_block():
    x = torch.zeros(64)
    x[5] = 100.0
    y = rotate(x, 32)
    assert torch.allclose(y[:32].abs(), torch.full((32,), 100 / 32**0.5))
    assert torch.count_nonzero(y[32:]) == 0


@pytest.mark.parametrize("head_dim,bad", [(64, 128), (64, 24), (96, 64), (64, 8)])
def test_invalid_blocks_raise(head_dim, bad):
    with pytest.raises(ValueError, match="Hadamard block"):
        rotate(torch.randn(2, head_dim), bad)


def test_valid_blocks():
    assert valid_had_blocks(64) == [16, 32, 64]
    assert valid_had_blocks(96) == [16, 32]
    assert valid_had_blocks(512) == [16, 32, 64, 128, 256]
