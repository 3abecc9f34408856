"""Shared pieces of the Triton paged-attention kernels: tile loads, the online-softmax step,
query/output handling (host-side launch helpers live in ``launch.py``).

How the kernels read the cache:

* One program owns one KV head, so all ``G = num_q_heads // num_kv_heads`` query heads of that
  KV head share every page load (GQA). Query rows are padded to 16 so the score and value
  products run on ``tl.dot``.
* Head vectors travel as halves (``lo = x[:d/2]``, ``hi = x[d/2:]``): an INT4 byte holds element
  i in its low nibble and i + d/2 in its high one, so unpacking is two integer ops, no shuffle.
  INT4/INT8 rows are byte-permuted within 16-token groups (fragment order for the CUDA decode
  kernel, ``page_layout.py``); these kernels gather them through the ``[16, P]`` byte table.
* Dequantization is folded into the products instead of applied per element:
  ``q.k_n = s_n (q.c_n) + m_n sum(q)`` and ``sum_n p_n v_n = (p * s_v) @ c + sum_n p_n m_n``,
  with the integer codes c (exact in bf16/fp16) fed straight to ``tl.dot``. Keys with one
  (scale, min) per half (``k_half_meta``) take the two halves' products apart:
  ``q.k_n = s_lo (q_lo.c_lo) + m_lo sum(q_lo) + s_hi (q_hi.c_hi) + m_hi sum(q_hi)``.
* The query is rotated once per program in registers; with rotated values the output is
  rotated back once (``sum p R v = R sum p v``). Keys were stored centered: softmax ignores the
  shared ``q.mu``, so the read path never sees the mean.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sawkv.kernels.rotation import rotate_halves

LOG2E = 1.4426950408889634
# Precision of the once-per-program query/output rotation dots. "ieee" (FMA path) is exact fp32
# and holds fewer registers than "tf32x3" at the rotation, which sets the kernel's peak.
ROT_PREC: tl.constexpr = tl.constexpr("ieee")


@triton.jit
def _to_dot(x, DOT: tl.constexpr):
    """Cast to the product dtype: 0 = fp32, 1 = fp16, 2 = bf16."""
    if DOT == 2:
        return x.to(tl.bfloat16)
    elif DOT == 1:
        return x.to(tl.float16)
    else:
        return x.to(tl.float32)


@triton.jit
def _codes_to_dot(c, DOT: tl.constexpr):
    """Integer codes (uint8) -> product dtype, exactly.

    For fp16 this is the "magic number" conversion: ``0x6400 | c`` is the fp16 bit pattern of
    ``1024 + c`` and subtracting 1024 in fp16 is exact, so integer ops replace an int->float
    conversion. The offset must go here, not later: folding ``1024 * sum(q)`` into the min term
    cancels two large fp32 sums and cost 1-4% relative error at 2K-32K tokens.
    """
    if DOT == 1:
        return (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    else:
        return _to_dot(c, DOT)


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    # fp32 operands (tests, fp32 models) keep full precision; tf32 would cost ~1e-3 relative.
    if DOT == 0:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _byte_offsets(row, o, perm_ptr, BITS: tl.constexpr, DH: tl.constexpr):
    """Element offsets ``[N, DH]`` of canonical bytes ``0..DH`` (INT4: all of a row; INT8: the
    first half) of tokens at group base ``row`` and offset ``o`` (mod 16) in their group.

    INT4/INT8 rows are byte-permuted within 16-token groups (``page_layout.py``); ``perm_ptr``
    is that ``[16, P]`` int32 table. Float pages keep plain rows (``perm_ptr`` unused)."""
    cols = tl.arange(0, DH)[None, :]
    if BITS == 16:
        return row[:, None] + cols
    p_row: tl.constexpr = DH if BITS == 4 else 2 * DH
    return row[:, None] + tl.load(perm_ptr + o[:, None] * p_row + cols)


@triton.jit
def _load_halves(page_ptr, row, o, perm_ptr, mask, BITS: tl.constexpr, DH: tl.constexpr):
    """Rows ``[N, d]`` of a page tile as halves ``[N, DH]`` (codes or floats, not yet scaled)."""
    off = _byte_offsets(row, o, perm_ptr, BITS, DH)
    if BITS == 4:
        b = tl.load(page_ptr + off, mask=mask[:, None], other=0)
        return b & 0xF, b >> 4
    else:
        lo = tl.load(page_ptr + off, mask=mask[:, None], other=0)
        if BITS == 16:
            hi = tl.load(page_ptr + off + DH, mask=mask[:, None], other=0)
        else:
            hi_off = _byte_offsets(row, o, perm_ptr + DH, BITS, DH)
            hi = tl.load(page_ptr + hi_off, mask=mask[:, None], other=0)
        return lo, hi


# PTX for 4 packed bytes -> 8 fp16 codes (4 low nibbles, 4 high nibbles), exactly: spread bytes
# to 16-bit lanes (prmt), mask a nibble and OR in 0x6400 (fp16 1024.0) in one lop3, then one
# exact fp16x2 subtraction of 1024 (see _codes_to_dot for why the offset goes here).
_INT4_TO_FP16_ASM = tl.constexpr("""{
.reg .b32 s01, s23, t01, t23, magic;
mov.b32 magic, 0x64006400;
prmt.b32 s01, $4, 0, 0x4140;
prmt.b32 s23, $4, 0, 0x4342;
lop3.b32 $0, s01, 0x000F000F, magic, 0xEA;
lop3.b32 $1, s23, 0x000F000F, magic, 0xEA;
shr.b32 t01, s01, 4;
shr.b32 t23, s23, 4;
lop3.b32 $2, t01, 0x000F000F, magic, 0xEA;
lop3.b32 $3, t23, 0x000F000F, magic, 0xEA;
sub.f16x2 $0, $0, magic;
sub.f16x2 $1, $1, magic;
sub.f16x2 $2, $2, magic;
sub.f16x2 $3, $3, magic;
}""")

# 4 packed bytes -> 4 fp16 codes (INT8 pages), same trick without the nibble split.
_INT8_TO_FP16_ASM = tl.constexpr("""{
.reg .b32 magic;
mov.b32 magic, 0x64006400;
prmt.b32 $0, $2, 0, 0x4140;
prmt.b32 $1, $2, 0, 0x4342;
or.b32 $0, $0, magic;
or.b32 $1, $1, magic;
sub.f16x2 $0, $0, magic;
sub.f16x2 $1, $1, magic;
}""")


@triton.jit
def _load_tile(
    page_ptr,
    row,
    o,
    perm_ptr,
    mask,
    BITS: tl.constexpr,
    DH: tl.constexpr,
    DOT: tl.constexpr,
    FAST: tl.constexpr,
):
    """Rows ``[N, d]`` of a page tile as halves ``[N, DH]`` in the product dtype: integer codes
    for INT4/INT8 pages (exact), the values themselves for float pages."""
    if FAST and DOT == 1 and BITS != 16:
        ptr = page_ptr + _byte_offsets(row, o, perm_ptr, BITS, DH)
        if BITS == 4:
            b = tl.load(ptr, mask=mask[:, None], other=0)
            lo, hi = tl.inline_asm_elementwise(
                _INT4_TO_FP16_ASM, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                is_pure=True, pack=4,
            )  # fmt: skip
        else:
            b_lo = tl.load(ptr, mask=mask[:, None], other=0)
            ptr_hi = page_ptr + _byte_offsets(row, o, perm_ptr + DH, BITS, DH)
            b_hi = tl.load(ptr_hi, mask=mask[:, None], other=0)
            lo = tl.inline_asm_elementwise(
                _INT8_TO_FP16_ASM, "=r,=r,r", [b_lo], dtype=tl.float16, is_pure=True, pack=4
            )
            hi = tl.inline_asm_elementwise(
                _INT8_TO_FP16_ASM, "=r,=r,r", [b_hi], dtype=tl.float16, is_pure=True, pack=4
            )
        return lo, hi
    lo, hi = _load_halves(page_ptr, row, o, perm_ptr, mask, BITS, DH)
    if BITS == 16:
        return _to_dot(lo, DOT), _to_dot(hi, DOT)
    return _codes_to_dot(lo, DOT), _codes_to_dot(hi, DOT)


@triton.jit
def _page_rows(
    bt_row_ptr,
    n,
    mask,
    h,
    stride_page_b,
    stride_page_h,
    stride_page_t,
    BLOCK_SIZE: tl.constexpr,
    GROUPED: tl.constexpr,
):
    """Element offset of the 16-token group holding positions ``n`` in head h's pages (float
    pages: of the row itself)."""
    page = tl.load(bt_row_ptr + n // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    in_page = n % BLOCK_SIZE
    if not GROUPED:
        return page * stride_page_b + h * stride_page_h + in_page * stride_page_t
    return page * stride_page_b + h * stride_page_h + (in_page - in_page % 16) * stride_page_t


@triton.jit
def _k_meta_rows(meta_row, K_HALF: tl.constexpr):
    """Offsets into ``k_meta`` from offsets ``meta_row`` into ``v_meta``: with K_HALF each key
    has 4 fp16 (``[..., 4]``) where a value has 2, and both tensors are contiguous with the
    same leading dims (``checks.check_pages``), so every offset doubles; else they coincide.
    One set of metadata strides then serves both (the kernels take ``v_meta``'s)."""
    if K_HALF:
        return meta_row * 2
    return meta_row


@triton.jit
def _meta_rows(
    bt_row_ptr, n, mask, h, stride_meta_b, stride_meta_h, stride_meta_t, BLOCK_SIZE: tl.constexpr
):
    page = tl.load(bt_row_ptr + n // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    return page * stride_meta_b + h * stride_meta_h + (n % BLOCK_SIZE) * stride_meta_t


@triton.jit
def _attend_tile(
    q_lo,  # [R, DH] product dtype, rotated and scaled
    q_hi,
    q_sum,  # [R] fp32 sum of q_lo and q_hi
    q_sum_lo,  # [R] fp32 sum of q_lo (K_HALF)
    q_sum_hi,  # [R] fp32 sum of q_hi (K_HALF)
    acc_lo,  # [R, DH] fp32
    acc_hi,
    m_i,  # [R] fp32 running max (log2 units)
    l_i,  # [R] fp32 running sum
    t0,  # first position of the tile
    hi,  # positions >= hi are out
    qpos,  # [R] position of each query row (CAUSAL)
    window,  # sliding window (CAUSAL; 0 = none)
    bt_row,  # this sequence's block table row
    h,  # KV head
    k_page_ptr,
    v_page_ptr,
    k_meta_ptr,
    v_meta_ptr,
    k_perm_ptr,  # [16, P] int32 byte order of a 16-token group (INT4/INT8)
    v_perm_ptr,
    stride_page_b,
    stride_page_h,
    stride_page_t,
    stride_meta_b,  # v_meta's strides (k_meta's offsets follow: _k_meta_rows)
    stride_meta_h,
    stride_meta_t,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BITS: tl.constexpr,
    DH: tl.constexpr,
    DOT: tl.constexpr,
    CAUSAL: tl.constexpr,
    FAST: tl.constexpr,
    TRANS_QK: tl.constexpr,
    K_HALF: tl.constexpr,  # keys carry (scale, min) per half: k_meta [..., 4]
):
    """One online-softmax step over the KV tile at positions ``t0 .. t0 + BLOCK_N``
    (scores in log2 units; q carries the softmax scale)."""
    n = t0 + tl.arange(0, BLOCK_N)
    tok_mask = n < hi
    page_row = _page_rows(
        bt_row, n, tok_mask, h, stride_page_b, stride_page_h, stride_page_t, BLOCK_SIZE, BITS != 16
    )
    o = n % 16
    meta_row = _meta_rows(
        bt_row, n, tok_mask, h, stride_meta_b, stride_meta_h, stride_meta_t, BLOCK_SIZE
    )
    if CAUSAL:
        allowed = tok_mask[None, :] & (n[None, :] <= qpos[:, None])
        if window > 0:
            allowed = allowed & (n[None, :] > qpos[:, None] - window)
    else:
        allowed = tok_mask[None, :] & (qpos[:, None] >= 0)
    k_lo, k_hi = _load_tile(k_page_ptr, page_row, o, k_perm_ptr, tok_mask, BITS, DH, DOT, FAST)
    if K_HALF and BITS != 16:
        # each half has its own (scale, min): the halves' products are scaled apart
        k_row = _k_meta_rows(meta_row, True)
        ks_lo = tl.load(k_meta_ptr + k_row, mask=tok_mask, other=0.0).to(tl.float32)
        km_lo = tl.load(k_meta_ptr + k_row + 1, mask=tok_mask, other=0.0).to(tl.float32)
        ks_hi = tl.load(k_meta_ptr + k_row + 2, mask=tok_mask, other=0.0).to(tl.float32)
        km_hi = tl.load(k_meta_ptr + k_row + 3, mask=tok_mask, other=0.0).to(tl.float32)
        if TRANS_QK:
            qk_lo = tl.trans(_dot(k_lo, tl.trans(q_lo), DOT))
            qk_hi = tl.trans(_dot(k_hi, tl.trans(q_hi), DOT))
        else:
            qk_lo = _dot(q_lo, tl.trans(k_lo), DOT)
            qk_hi = _dot(q_hi, tl.trans(k_hi), DOT)
        qk = qk_lo * ks_lo[None, :] + q_sum_lo[:, None] * km_lo[None, :]
        qk += qk_hi * ks_hi[None, :] + q_sum_hi[:, None] * km_hi[None, :]
    else:
        if TRANS_QK:
            # K as the A operand (fresh registers every tile) and q^T as B: saves the register
            # copies of q that the A-operand form costs, at the price of one transpose of the
            # scores
            qk = tl.trans(_dot(k_lo, tl.trans(q_lo), DOT) + _dot(k_hi, tl.trans(q_hi), DOT))
        else:
            qk = _dot(q_lo, tl.trans(k_lo), DOT)
            qk += _dot(q_hi, tl.trans(k_hi), DOT)
        if BITS != 16:
            ks = tl.load(k_meta_ptr + meta_row, mask=tok_mask, other=0.0).to(tl.float32)
            km = tl.load(k_meta_ptr + meta_row + 1, mask=tok_mask, other=0.0).to(tl.float32)
            # q.(c s + m) = s (q.c) + m sum(q); q_sum sums the same rounded q the dot used
            qk = qk * ks[None, :] + q_sum[:, None] * km[None, :]
    qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    # a row that has seen nothing yet keeps m = -inf; subtract 0 instead so no inf - inf NaN
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(qk - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_lo, v_hi = _load_tile(v_page_ptr, page_row, o, v_perm_ptr, tok_mask, BITS, DH, DOT, FAST)
    if BITS != 16:
        vs = tl.load(v_meta_ptr + meta_row, mask=tok_mask, other=0.0).to(tl.float32)
        vm = tl.load(v_meta_ptr + meta_row + 1, mask=tok_mask, other=0.0).to(tl.float32)
        ps = _to_dot(p * vs[None, :], DOT)
        pm = tl.sum(p * vm[None, :], axis=1)
        acc_lo = acc_lo * alpha[:, None] + _dot(ps, v_lo, DOT) + pm[:, None]
        acc_hi = acc_hi * alpha[:, None] + _dot(ps, v_hi, DOT) + pm[:, None]
    else:
        p16 = _to_dot(p, DOT)
        acc_lo = acc_lo * alpha[:, None] + _dot(p16, v_lo, DOT)
        acc_hi = acc_hi * alpha[:, None] + _dot(p16, v_hi, DOT)
    return acc_lo, acc_hi, m_new, l_i


@triton.jit
def _load_query(
    q_ptr,
    rows_off,
    row_mask,
    norm,
    qscale,
    DH: tl.constexpr,
    R: tl.constexpr,
    HAD: tl.constexpr,
    DOT: tl.constexpr,
):
    """Query rows ``[R, d]`` -> rotated, scaled halves ``q_lo, q_hi [R, DH]`` in the product
    dtype, and the row sums ``q_sum, q_sum_lo, q_sum_hi [R]`` fp32 of both halves, of q_lo
    and of q_hi (``k_half_meta`` keys scale the halves apart)."""
    cols = tl.arange(0, DH)[None, :]
    ptr = q_ptr + rows_off[:, None] + cols
    q_lo = tl.load(ptr, mask=row_mask[:, None], other=0.0).to(tl.float32)
    q_hi = tl.load(ptr + DH, mask=row_mask[:, None], other=0.0).to(tl.float32)
    if HAD > 0:
        q_lo, q_hi = rotate_halves(q_lo, q_hi, norm, R, DH, HAD, ROT_PREC)
    q_lo = _to_dot(q_lo * qscale, DOT)
    q_hi = _to_dot(q_hi * qscale, DOT)
    # sums of the rounded query, so m_n * sum(q) matches the product the codes see
    q_sum_lo = tl.sum(q_lo.to(tl.float32), axis=1)
    q_sum_hi = tl.sum(q_hi.to(tl.float32), axis=1)
    return q_lo, q_hi, q_sum_lo + q_sum_hi, q_sum_lo, q_sum_hi


@triton.jit
def _store_out(
    out_ptr,
    rows_off,
    row_mask,
    acc_lo,
    acc_hi,
    l_i,
    norm,
    DH: tl.constexpr,
    R: tl.constexpr,
    HAD: tl.constexpr,
    ROT_V: tl.constexpr,
):
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    o_lo = acc_lo * inv_l[:, None]
    o_hi = acc_hi * inv_l[:, None]
    if ROT_V:
        o_lo, o_hi = rotate_halves(o_lo, o_hi, norm, R, DH, HAD, ROT_PREC)
    cols = tl.arange(0, DH)[None, :]
    ptr = out_ptr + rows_off[:, None] + cols
    ty = out_ptr.dtype.element_ty
    tl.store(ptr, o_lo.to(ty), mask=row_mask[:, None])
    tl.store(ptr + DH, o_hi.to(ty), mask=row_mask[:, None])
