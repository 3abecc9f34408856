"""Block-diagonal Hadamard rotation (BDR).

The rotation applied to a head vector x of size ``head_dim`` is ``R = diag(H_b, ..., H_b)`` with
``H_b`` the normalized Sylvester Hadamard matrix of size ``had_block`` (a power of two dividing
head_dim). ``H_b`` is orthogonal *and* symmetric, so ``R`` is its own inverse: the same function
rotates and un-rotates, and ``q·k == (Rq)·(Rk)``.
"""

from __future__ import annotations

import functools
import math

import torch

MIN_HAD_BLOCK = 16
MAX_HAD_BLOCK = 256


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_had_block(had_block: int, head_dim: int) -> None:
    """Raise ``ValueError`` unless ``had_block`` is a valid Hadamard block for ``head_dim``."""
    valid = valid_had_blocks(head_dim)
    if had_block not in valid:
        raise ValueError(
            f"Hadamard block {had_block} is not valid for head_dim {head_dim}: it must be a power "
            f"of two in [{MIN_HAD_BLOCK}, {MAX_HAD_BLOCK}] dividing head_dim; valid: {valid}"
        )


def valid_had_blocks(head_dim: int) -> list[int]:
    """Hadamard block sizes usable at ``head_dim``: powers of two in [16, 256] dividing it."""
    out, b = [], MIN_HAD_BLOCK
    while b <= min(head_dim, MAX_HAD_BLOCK):
        if head_dim % b == 0:
            out.append(b)
        b *= 2
    return out


@functools.lru_cache(maxsize=32)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix ``[n, n]`` (orthogonal, symmetric); n a power of 2."""
    if not is_power_of_two(n):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    return _sylvester(n).to(dtype=dtype, device=device)


def block_hadamard_matrix(head_dim: int, had_block: int, dtype=torch.float32, device=None):
    """The full block-diagonal rotation ``[head_dim, head_dim]`` with blocks of ``had_block``."""
    check_had_block(had_block, head_dim)
    h = hadamard_matrix(had_block, torch.float64)
    return torch.block_diag(*([h] * (head_dim // had_block))).to(dtype=dtype, device=device)


def rotate_matmul(x: torch.Tensor, had_block: int) -> torch.Tensor:
    """Rotate the last dim of ``x [..., head_dim]`` by one dense matmul per Hadamard block.

    Computed in fp32 (or fp64 for fp64 inputs) and returned in ``x.dtype``.
    """
    d = x.shape[-1]
    check_had_block(had_block, d)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = hadamard_matrix(had_block, cdt, x.device)
    y = x.to(cdt).reshape(*x.shape[:-1], d // had_block, had_block) @ h
    return y.reshape(x.shape).to(x.dtype)


def rotate(x: torch.Tensor, had_block: int) -> torch.Tensor:
    """Rotate the last dim of ``x [..., head_dim]`` with the fast Walsh-Hadamard butterfly.

    ``log2(had_block)`` stages of (a + b, a - b) over each block, then one 1/sqrt(b) scale:
    O(d log b) instead of O(d b). Same result as :func:`rotate_matmul` up to float rounding.
    Computed in fp32 (fp64 for fp64 inputs), returned in ``x.dtype``.
    """
    d = x.shape[-1]
    check_had_block(had_block, d)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(cdt).reshape(-1, d // had_block, had_block)
    h = 1
    while h < had_block:
        # pair element j with j + h inside each span of 2h
        y = y.reshape(y.shape[0], d // had_block, had_block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    y = y.reshape(x.shape) * (1.0 / math.sqrt(had_block))
    return y.to(x.dtype)
