"""Block-diagonal Hadamard rotation of register tiles, shared by the Triton kernels.

Head vectors travel as two halves ``lo = x[:d/2]`` and ``hi = x[d/2:]`` because INT4 packs
element i with element i + d/2 in one byte: unpacking gives the halves with no shuffles. The
rotation works on the halves directly:

* ``had_block <= d/2``: each half is a whole number of Hadamard blocks; rotate each on its own.
* ``had_block == d``: Sylvester's ``H_d = [[H, H], [H, -H]]`` with ``H = H_{d/2}``, so
  ``(lo, hi) H_d = ((lo + hi) H, (lo - hi) H)``: one butterfly stage, then blocks of d/2.

The unnormalized ±1 matrix is generated in registers (``H[i, j] = (-1)^popcount(i & j)``; no
table load per program) and applied with ``tl.dot``; the ``1/sqrt(had_block)`` normalization
is one multiply at the end (``norm`` from the host), as in ``sawkv.quant.hadamard.rotate``.
The dot is fp32 with ``tf32x3`` precision (three tf32 products on the tensor cores, ~fp32
accuracy): plain tf32 would perturb the rotated values by ~1e-3 relative and flip many more
INT4 codes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _hadamard_pm1(B: tl.constexpr):
    """Unnormalized Sylvester Hadamard ``[B, B]`` fp32 of ±1 (B a power of two <= 256)."""
    i = tl.arange(0, B)[:, None]
    j = tl.arange(0, B)[None, :]
    x = i & j
    x = x ^ (x >> 4)
    x = x ^ (x >> 2)
    x = x ^ (x >> 1)
    return 1.0 - 2.0 * (x & 1).to(tl.float32)


@triton.jit
def _rotate_blocks(x, ROWS: tl.constexpr, DH: tl.constexpr, B: tl.constexpr, PREC: tl.constexpr):
    """``x [ROWS, DH]`` fp32 times ``diag(H_B, ...)`` (unnormalized); needs ROWS*DH/B >= 16."""
    h = _hadamard_pm1(B)
    y = tl.dot(tl.reshape(x, (ROWS * DH // B, B)), h, input_precision=PREC)
    return tl.reshape(y, (ROWS, DH))


@triton.jit
def rotate_halves(
    lo,
    hi,
    norm,
    ROWS: tl.constexpr,
    DH: tl.constexpr,
    HAD: tl.constexpr,
    PREC: tl.constexpr,
):
    """Rotate rows ``[lo | hi]`` (each ``[ROWS, DH]`` fp32, head_dim = 2*DH) by the normalized
    block-diagonal Hadamard with block HAD (16 <= HAD <= 2*DH). ``norm`` is ``1/sqrt(HAD)``
    passed from the host as fp32, the same constant torch multiplies by. ``PREC`` is the dot's
    ``input_precision`` ("tf32x3" or "ieee"). Returns the rotated halves."""
    if HAD == 2 * DH:
        a = lo + hi
        b = lo - hi
        lo = _rotate_blocks(a, ROWS, DH, DH, PREC)
        hi = _rotate_blocks(b, ROWS, DH, DH, PREC)
    else:
        lo = _rotate_blocks(lo, ROWS, DH, HAD, PREC)
        hi = _rotate_blocks(hi, ROWS, DH, HAD, PREC)
    return lo * norm, hi * norm
