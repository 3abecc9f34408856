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
Two precisions (``PREC``):

* ``"tf32x3"``: fp32 inputs, three tf32 products on the tensor cores (~fp32 accuracy); plain
  tf32 would perturb the rotated values by ~1e-3 relative and flip many more INT4 codes.
* ``"exact16"``: inputs that are exactly bf16 (or fp16) values, as the model's K/V are before
  centering. The ±1 matrix is exact in that dtype too, so one 16-bit MMA gives exact products
  summed in fp32: as accurate as tf32x3 at a third of the tensor-core work and without the
  fp32 splitting. ``H_d`` is then applied as ``(lo H, hi H) -> (lo H + hi H, lo H - hi H)``,
  since ``lo + hi`` would no longer be a 16-bit value; a key mean is subtracted *after* the
  rotation (``R (k - mu) = R k - R mu``, ``R mu`` from the host). Under the CPU interpreter
  the host passes ``"exact16_emulated"``: the same products as an fp32 dot, because Triton
  3.6's interpreter gets bf16 dots wrong; ``bench_kernels.py``'s GPU check pass covers the
  16-bit MMA itself; it is ``cache_write.DEFAULT_ROTATION_16``.

:func:`rotate_cast` is the one host-side launcher here: whole ``[T, H, d]`` tensors rotated
(or only cast) in one pass, for the SDPA extend path's query and output, the fused extend
kernel's output with rotated values, the exact attention sinks, and a key mean's ``R mu``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sawkv.kernels.launch import _interpreting
from sawkv.kernels.page_format import check_had_block


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
    """``x [ROWS, DH]`` times ``diag(H_B, ...)`` (unnormalized), fp32 out; needs ROWS*DH/B >= 16.
    ``PREC == "exact16"``: x holds 16-bit values (bf16 or fp16 dtype), the dot is 16-bit."""
    if PREC == "exact16":
        h = _hadamard_pm1(B).to(x.dtype)
        y = tl.dot(tl.reshape(x, (ROWS * DH // B, B)), h)
    elif PREC == "exact16_emulated":
        # the same exact products in fp32: Triton 3.6's interpreter computes bf16 dots wrongly
        h = _hadamard_pm1(B)
        y = tl.dot(tl.reshape(x.to(tl.float32), (ROWS * DH // B, B)), h, input_precision="ieee")
    else:
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
    """Rotate rows ``[lo | hi]`` (each ``[ROWS, DH]``, head_dim = 2*DH) by the normalized
    block-diagonal Hadamard with block HAD (16 <= HAD <= 2*DH). ``norm`` is ``1/sqrt(HAD)``
    passed from the host as fp32, the same constant torch multiplies by. ``PREC``: "tf32x3" or
    "ieee" (fp32 halves; the dot's ``input_precision``) or "exact16" (bf16/fp16 halves, see the
    module docstring). Returns the rotated halves in fp32."""
    if (PREC == "exact16" or PREC == "exact16_emulated") and HAD == 2 * DH:
        a = _rotate_blocks(lo, ROWS, DH, DH, PREC)
        b = _rotate_blocks(hi, ROWS, DH, DH, PREC)
        lo = a + b
        hi = a - b
    elif HAD == 2 * DH:
        a = lo + hi
        b = lo - hi
        lo = _rotate_blocks(a, ROWS, DH, DH, PREC)
        hi = _rotate_blocks(b, ROWS, DH, DH, PREC)
    else:
        lo = _rotate_blocks(lo, ROWS, DH, HAD, PREC)
        hi = _rotate_blocks(hi, ROWS, DH, HAD, PREC)
    return lo * norm, hi * norm


@triton.jit
def load_rotated_rows(x_ptr, rows, stride_t, h, stride_h, row_mask, mean_ptr, stride_mean_h,
                      norm, ROWS: tl.constexpr, HAS_MEAN: tl.constexpr, ROTATE: tl.constexpr,
                      HAD: tl.constexpr, DH: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Rows ``[ROWS, D]`` of one head as fp32 halves, centered and rotated as stored.

    ``PREC == "exact16"`` with ``ROTATE``: the rows are rotated as loaded (16-bit, exact) and
    ``mean_ptr`` holds the *rotated* mean ``R mu`` (fp32), subtracted afterwards. Otherwise the
    rows are centered by the plain mean in fp32 and rotated with ``PREC`` (rotation.py)."""
    cols = tl.arange(0, DH)[None, :]
    ptr = x_ptr + rows.to(tl.int64)[:, None] * stride_t + h * stride_h + cols
    lo = tl.load(ptr, mask=row_mask[:, None], other=0.0)
    hi = tl.load(ptr + DH, mask=row_mask[:, None], other=0.0)
    mu = mean_ptr + h * stride_mean_h + tl.arange(0, DH)
    if ROTATE and (PREC == "exact16" or PREC == "exact16_emulated"):
        lo, hi = rotate_halves(lo, hi, norm, ROWS, DH, HAD, PREC)
        if HAS_MEAN:
            lo -= tl.load(mu).to(tl.float32)[None, :]
            hi -= tl.load(mu + DH).to(tl.float32)[None, :]
    else:
        lo = lo.to(tl.float32)
        hi = hi.to(tl.float32)
        if HAS_MEAN:
            lo -= tl.load(mu).to(tl.float32)[None, :]
            hi -= tl.load(mu + DH).to(tl.float32)[None, :]
        if ROTATE:
            lo, hi = rotate_halves(lo, hi, norm, ROWS, DH, HAD, PREC)
    return lo, hi


@triton.jit
def _rotate_cast_kernel(
    x_ptr,  # [T, H, D] float, last dim contiguous
    out_ptr,  # [T, H, D] output dtype, last dim contiguous
    num_rows,  # T * H
    num_heads,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    norm,  # fp32 1/sqrt(HAD)
    D: tl.constexpr,
    HAD: tl.constexpr,  # 0: no rotation (cast only)
    PREC: tl.constexpr,  # rotation.py: "exact16" (16-bit x), "exact16_emulated", "ieee"
    CLAMP16: tl.constexpr,  # clamp to fp16's range (NaN stays NaN), as torch's clamp
    BLOCK_ROWS: tl.constexpr,
):
    DH: tl.constexpr = D // 2
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    mask = (rows < num_rows)[:, None]
    t = (rows // num_heads).to(tl.int64)
    h = rows % num_heads
    cols = tl.arange(0, DH)[None, :]
    src = x_ptr + (t * stride_xt + h * stride_xh)[:, None] + cols
    lo = tl.load(src, mask=mask, other=0.0)
    hi = tl.load(src + DH, mask=mask, other=0.0)
    if HAD > 0:
        if PREC == "ieee":
            lo, hi = lo.to(tl.float32), hi.to(tl.float32)
        lo, hi = rotate_halves(lo, hi, norm, BLOCK_ROWS, DH, HAD, PREC)
    else:
        lo, hi = lo.to(tl.float32), hi.to(tl.float32)
    if CLAMP16:
        lo = tl.minimum(tl.maximum(lo, -65504.0, propagate_nan=tl.PropagateNan.ALL), 65504.0,
                        propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
        hi = tl.minimum(tl.maximum(hi, -65504.0, propagate_nan=tl.PropagateNan.ALL), 65504.0,
                        propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
    dst = out_ptr + (t * stride_ot + h * stride_oh)[:, None] + cols
    ty = out_ptr.dtype.element_ty
    tl.store(dst, lo.to(ty), mask=mask)
    tl.store(dst + DH, hi.to(ty), mask=mask)


def rotate_cast(x: torch.Tensor, had_block: int, out: torch.Tensor) -> torch.Tensor:
    """``out = R x`` (block-diagonal Hadamard of block ``had_block``; 0: ``out = x``) in one
    pass, rounded once to ``out``'s dtype and clamped to +-65504 when that is fp16. The SDPA
    extend path did this with five torch ops over an fp32 copy of the queries: on an 8K-token
    chunk of 32 query heads ~0.9 GB of memory traffic per layer, against ~0.13 GB here.

    Args:
        x: ``[T, H, d]`` bf16/fp16/fp32, last dim contiguous (e.g. the step's queries, or the
            attention output to rotate back).
        had_block: 0 or the Hadamard block (a power of two in [16, d] dividing d).
        out: ``[T, H, d]`` bf16/fp16/fp32, last dim contiguous, written in place.
    Returns:
        ``out``. 16-bit ``x`` is rotated on 16-bit tensor cores (exact products summed in fp32,
        ``rotation.py``'s "exact16"); fp32 ``x`` in fp32 FMAs.
    """
    interpreting = _interpreting()
    if x.shape != out.shape or x.dim() != 3:
        raise ValueError(f"x and out must be [T, H, d] of one shape, got {x.shape}, {out.shape}")
    floats = (torch.bfloat16, torch.float16, torch.float32)
    if x.dtype not in floats or out.dtype not in floats:
        raise ValueError(f"x and out must be bf16, fp16 or fp32, got {x.dtype}, {out.dtype}")
    if x.device != out.device or (x.device.type != "cuda" and not interpreting):
        raise ValueError(
            f"x and out must be on one CUDA device (or TRITON_INTERPRET=1), got {x.device}, "
            f"{out.device}"
        )
    if x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("x and out must be contiguous in their last dim")
    num_tokens, num_heads, head_dim = x.shape
    if head_dim < 32 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 32, got {head_dim}")
    check_had_block(had_block, head_dim)
    if num_tokens == 0:
        return out
    prec = "exact16" if x.dtype in (torch.bfloat16, torch.float16) else "ieee"
    if prec == "exact16" and interpreting:
        prec = "exact16_emulated"  # rotation.py: the interpreter's 16-bit dots are wrong
    rows = num_tokens * num_heads
    _rotate_cast_kernel[(triton.cdiv(rows, 16),)](
        x, out, rows, num_heads, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        1.0 / had_block**0.5 if had_block else 1.0, D=head_dim, HAD=had_block, PREC=prec,
        CLAMP16=out.dtype == torch.float16, BLOCK_ROWS=16, num_warps=4,
    )  # fmt: skip
    return out
