"""Paged attention over INT4 / INT8 / float pages: split-K decode (FlashDecoding) and extend.

Layout and contracts as in :mod:`sawkv.kernels.cache_write` and ``sawkv.attention.reference``.

How the kernels read the cache:

* One program owns one KV head of one sequence, so all ``G = num_q_heads // num_kv_heads``
  query heads of that KV head share every page load (GQA). Query rows are padded to 16 so the
  score and value products run on ``tl.dot``.
* Head vectors travel as halves (``lo = x[:d/2]``, ``hi = x[d/2:]``): an INT4 byte holds element
  i in its low nibble and i + d/2 in its high one, so unpacking is two integer ops, no shuffle.
* Dequantization is folded into the products instead of applied per element:
  ``q.k_n = s_n (q.c_n) + m_n sum(q)`` and ``sum_n p_n v_n = (p * s_v) @ c + sum_n p_n m_n``,
  with the integer codes c (exact in bf16/fp16) fed straight to ``tl.dot``.
* The query is rotated once per program in registers; with rotated values the output is
  rotated back once (``sum p R v = R sum p v``). Keys were stored centered: softmax ignores the
  shared ``q.mu``, so the read path never sees the mean.
* Decode splits each sequence into ``num_splits`` ranges (one program each) and a second kernel
  merges the partial softmax states, so one long sequence still fills the GPU. With one split
  (and no value rotation) the first kernel finishes the output itself.

Where the time goes (H100, Qwen3-8B shape; benchmarks/results/kernels_h100.json): the BF16-page
path of the same kernel reads at ~90-95% of copy bandwidth, the INT4 path at ~40-50%. INT4 is
bound by instructions per (token, head), not bytes: the tensor-core operand layout wants pairs
of codes that are consecutive along d (K) or along tokens (V) in one register, while a V page is
token-major bytes, so every V byte is gathered from shared memory on its own and repacked; with
the nibble split, the magic-number conversion, the score/softmax work on 16 padded query rows
(4 real at GQA 4) and per-token page addressing this is ~40 warp instructions per 136 bytes.
A layout with tokens innermost for V (or an mma-fragment-ordered packing) would remove the
gathers; both change the page format, so they are left to a measured follow-up.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sawkv.kernels.checks import check_attention_inputs, check_out, check_tensor
from sawkv.kernels.rotation import rotate_halves

LOG2E = 1.4426950408889634
# Precision of the once-per-program query/output rotation dots. "ieee" (FMA path) is exact fp32
# and holds fewer registers than "tf32x3" at the rotation, which sets the kernel's peak.
ROT_PREC: tl.constexpr = tl.constexpr("ieee")


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch knobs. ``block_n`` KV tokens per tile; ``num_splits`` (decode) 0 =
    pick from the SM count; ``block_r`` query rows (token x head) per extend program;
    ``trans_qk`` computes the scores as ``K q^T`` (K the tensor-core A operand); ``maxnreg``
    caps registers per thread (None: the launcher's choice)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int = 0
    block_r: int = 64
    trans_qk: bool = False
    maxnreg: int | None = None


# Measured on the H100 (benchmarks/bench_kernels.py --sweep / --sweep-occupancy, Qwen3-8B shape):
# 256-token tiles over 8 warps with registers capped at 128 (2 programs = 16 warps per SM) had
# the best geometric mean over B=1/32/256; 128-token tiles over 4 warps were within 5% at B=256
# but 15-20% slower at B=1 and B=32. d=256 keeps 128-token tiles and no cap (more live state).
DECODE_CONFIG = KernelConfig(block_n=256, num_warps=8, num_stages=3)
DECODE_CONFIG_D256 = KernelConfig(block_n=128, num_warps=8, num_stages=2)
EXTEND_CONFIG = KernelConfig(block_n=64, num_warps=4, num_stages=2, block_r=64)


# ---- shared tile helpers -----------------------------------------------------------------------
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
    """Integer codes (uint8, < 1024) -> product dtype, exactly, plus ``_code_offset(DOT)``.

    For fp16 this is the "magic number" conversion: ``0x6400 | c`` is the fp16 bit pattern of
    ``1024 + c``, so integer ops replace an int->float conversion, which runs at a quarter of the
    ALU rate on Hopper and bounded the INT4 kernel. The 1024 is folded into the min term.
    """
    if DOT == 1:
        return (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    else:
        return _to_dot(c, DOT)


@triton.jit
def _code_offset(DOT: tl.constexpr):
    """What :func:`_codes_to_dot` adds to every code (exact integers either way)."""
    if DOT == 1:
        return 1024.0
    else:
        return 0.0


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    # fp32 operands (tests, fp32 models) keep full precision; tf32 would cost ~1e-3 relative.
    if DOT == 0:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_halves(page_ptr, row, mask, BITS: tl.constexpr, DH: tl.constexpr):
    """Rows ``[N, d]`` of a page tile as halves ``[N, DH]`` (codes or floats, not yet scaled)."""
    cols = tl.arange(0, DH)[None, :]
    ptr = page_ptr + row[:, None] + cols
    if BITS == 4:
        b = tl.load(ptr, mask=mask[:, None], other=0)
        return b & 0xF, b >> 4
    else:
        lo = tl.load(ptr, mask=mask[:, None], other=0)
        hi = tl.load(ptr + DH, mask=mask[:, None], other=0)
        return lo, hi


# PTX for 4 packed bytes -> 8 fp16 values 1024 + code (4 low nibbles, 4 high nibbles), exactly:
# spread bytes to 16-bit lanes (prmt), mask a nibble and OR in 0x6400 (fp16 1024.0) in one lop3.
# One instruction per code instead of ~3.5 that the compiler emits for the element-wise Triton
# ops; the 1024 offset is not subtracted per element but folded into the min term (CODE_OFFSET).
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
}""")

# 4 packed bytes -> 4 fp16 values 1024 + code (INT8 pages), same trick without the nibble split.
_INT8_TO_FP16_ASM = tl.constexpr("""{
.reg .b32 magic;
mov.b32 magic, 0x64006400;
prmt.b32 $0, $2, 0, 0x4140;
prmt.b32 $1, $2, 0, 0x4342;
or.b32 $0, $0, magic;
or.b32 $1, $1, magic;
}""")


@triton.jit
def _load_tile(
    page_ptr,
    row,
    mask,
    BITS: tl.constexpr,
    DH: tl.constexpr,
    DOT: tl.constexpr,
    FAST: tl.constexpr,
):
    """Rows ``[N, d]`` of a page tile as halves ``[N, DH]`` in the product dtype: integer codes
    for INT4/INT8 pages (exact), the values themselves for float pages."""
    if FAST and DOT == 1 and BITS != 16:
        cols = tl.arange(0, DH)[None, :]
        ptr = page_ptr + row[:, None] + cols
        if BITS == 4:
            b = tl.load(ptr, mask=mask[:, None], other=0)
            lo, hi = tl.inline_asm_elementwise(
                _INT4_TO_FP16_ASM, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                is_pure=True, pack=4,
            )  # fmt: skip
        else:
            b_lo = tl.load(ptr, mask=mask[:, None], other=0)
            b_hi = tl.load(ptr + DH, mask=mask[:, None], other=0)
            lo = tl.inline_asm_elementwise(
                _INT8_TO_FP16_ASM, "=r,=r,r", [b_lo], dtype=tl.float16, is_pure=True, pack=4
            )
            hi = tl.inline_asm_elementwise(
                _INT8_TO_FP16_ASM, "=r,=r,r", [b_hi], dtype=tl.float16, is_pure=True, pack=4
            )
        return lo, hi
    lo, hi = _load_halves(page_ptr, row, mask, BITS, DH)
    if BITS == 16:
        return _to_dot(lo, DOT), _to_dot(hi, DOT)
    return _codes_to_dot(lo, DOT), _codes_to_dot(hi, DOT)


@triton.jit
def _page_rows(
    bt_row_ptr, n, mask, h, stride_page_b, stride_page_h, stride_page_t, BLOCK_SIZE: tl.constexpr
):
    """Element offset of token positions ``n`` (one sequence's block table) in head h's pages."""
    page = tl.load(bt_row_ptr + n // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    return page * stride_page_b + h * stride_page_h + (n % BLOCK_SIZE) * stride_page_t


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
    q_sum,  # [R] fp32
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
    stride_page_b,
    stride_page_h,
    stride_page_t,
    stride_meta_b,
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
):
    """One online-softmax step over the KV tile at positions ``t0 .. t0 + BLOCK_N``
    (scores in log2 units; q carries the softmax scale)."""
    n = t0 + tl.arange(0, BLOCK_N)
    tok_mask = n < hi
    page_row = _page_rows(
        bt_row, n, tok_mask, h, stride_page_b, stride_page_h, stride_page_t, BLOCK_SIZE
    )
    meta_row = _meta_rows(
        bt_row, n, tok_mask, h, stride_meta_b, stride_meta_h, stride_meta_t, BLOCK_SIZE
    )
    if CAUSAL:
        allowed = tok_mask[None, :] & (n[None, :] <= qpos[:, None])
        if window > 0:
            allowed = allowed & (n[None, :] > qpos[:, None] - window)
    else:
        allowed = tok_mask[None, :] & (qpos[:, None] >= 0)
    k_lo, k_hi = _load_tile(k_page_ptr, page_row, tok_mask, BITS, DH, DOT, FAST)
    if TRANS_QK:
        # K as the A operand (fresh registers every tile) and q^T as B: saves the register
        # copies of q that the A-operand form costs, at the price of one transpose of the scores
        qk = tl.trans(_dot(k_lo, tl.trans(q_lo), DOT) + _dot(k_hi, tl.trans(q_hi), DOT))
    else:
        qk = _dot(q_lo, tl.trans(k_lo), DOT)
        qk += _dot(q_hi, tl.trans(k_hi), DOT)
    if BITS != 16:
        ks = tl.load(k_meta_ptr + meta_row, mask=tok_mask, other=0.0).to(tl.float32)
        km = tl.load(k_meta_ptr + meta_row + 1, mask=tok_mask, other=0.0).to(tl.float32)
        # q.(c + off) s + (m - off s) sum(q) = q.(c s + m): the offset cancels exactly up to
        # fp32 rounding, because q_sum is the sum of the same rounded q the dot used
        km = km - _code_offset(DOT) * ks
        qk = qk * ks[None, :] + q_sum[:, None] * km[None, :]
    qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    # a row that has seen nothing yet keeps m = -inf; subtract 0 instead so no inf - inf NaN
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(qk - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_lo, v_hi = _load_tile(v_page_ptr, page_row, tok_mask, BITS, DH, DOT, FAST)
    if BITS != 16:
        vs = tl.load(v_meta_ptr + meta_row, mask=tok_mask, other=0.0).to(tl.float32)
        vm = tl.load(v_meta_ptr + meta_row + 1, mask=tok_mask, other=0.0).to(tl.float32)
        ps = _to_dot(p * vs[None, :], DOT)
        # (p s) @ (c + off) + sum(p m) - off sum(p s), with the rounded p s the dot sees
        pm = tl.sum(p * vm[None, :], axis=1) - _code_offset(DOT) * tl.sum(ps.to(tl.float32), axis=1)
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
    """Query rows ``[R, d]`` -> rotated, scaled halves in the product dtype, and their row sum."""
    cols = tl.arange(0, DH)[None, :]
    ptr = q_ptr + rows_off[:, None] + cols
    q_lo = tl.load(ptr, mask=row_mask[:, None], other=0.0).to(tl.float32)
    q_hi = tl.load(ptr + DH, mask=row_mask[:, None], other=0.0).to(tl.float32)
    if HAD > 0:
        q_lo, q_hi = rotate_halves(q_lo, q_hi, norm, R, DH, HAD, ROT_PREC)
    q_lo = _to_dot(q_lo * qscale, DOT)
    q_hi = _to_dot(q_hi * qscale, DOT)
    # sum of the rounded query, so m_n * sum(q) matches the product the codes see
    q_sum = tl.sum(q_lo.to(tl.float32), axis=1) + tl.sum(q_hi.to(tl.float32), axis=1)
    return q_lo, q_hi, q_sum


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


# ---- decode ------------------------------------------------------------------------------------
@triton.jit
def _decode_kernel(
    q_ptr,  # [S, Hq, D]
    k_page_ptr,  # [num_blocks, Hkv, block_size, P]
    v_page_ptr,
    k_meta_ptr,  # [num_blocks, Hkv, block_size, 2] fp16 (dummy for BITS=16)
    v_meta_ptr,
    bt_ptr,  # [S, max_blocks] int32
    lens_ptr,  # [S] int32
    out_ptr,  # [S, Hq, D] (SINGLE)
    part_o_ptr,  # [S, Hq, NUM_SPLITS, D] fp32 unnormalized partial outputs (not SINGLE)
    part_ml_ptr,  # [S, Hq, NUM_SPLITS, 2] fp32 (running max in log2 units, sum of weights)
    norm,
    qscale,
    window,
    stride_qs,
    stride_qh,
    stride_bt,
    stride_page_b,
    stride_page_h,
    stride_page_t,
    stride_meta_b,
    stride_meta_h,
    stride_meta_t,
    stride_os,
    stride_oh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    HAD: tl.constexpr,
    ROT_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SINGLE: tl.constexpr,
    DOT: tl.constexpr,
    INTERPRET: tl.constexpr,
    TRANS_QK: tl.constexpr,
):
    """SINGLE: one split and no output rotation, so this kernel writes ``out`` itself. Otherwise
    it writes partial states and :func:`_decode_reduce_kernel` merges (and rotates back): the
    output rotation's registers would otherwise raise this kernel's peak and cost occupancy."""
    DH: tl.constexpr = D // 2
    h = tl.program_id(0)
    s = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + s)
    start = seq_len * 0
    if window > 0:
        start = tl.maximum(seq_len - window, 0)
    # this split's range of positions, whole tiles, relative to the window start
    # (tl.cdiv on scalars yields a 1-element tensor under the interpreter; spell it out)
    per_split = (seq_len - start + NUM_SPLITS - 1) // NUM_SPLITS
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(seq_len, lo + chunk)

    g = tl.arange(0, G_PAD)
    row_mask = g < G
    q_rows = s.to(tl.int64) * stride_qs + (h * G + g) * stride_qh
    q_lo, q_hi, q_sum = _load_query(q_ptr, q_rows, row_mask, norm, qscale, DH, G_PAD, HAD, DOT)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc_lo = tl.zeros([G_PAD, DH], tl.float32)
    acc_hi = tl.zeros([G_PAD, DH], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    qpos = g * 0 + seq_len  # the query sits at the last position: sees everything below hi
    if INTERPRET:
        # the interpreter cannot take tensor bounds in range() with NumPy >= 2; GPU builds keep
        # tl.range, which the software pipeliner needs
        t0 = lo
        while t0 < hi:
            acc_lo, acc_hi, m_i, l_i = _attend_tile(
                q_lo, q_hi, q_sum, acc_lo, acc_hi, m_i, l_i, t0, hi, qpos, 0, bt_row, h,
                k_page_ptr, v_page_ptr, k_meta_ptr, v_meta_ptr, stride_page_b, stride_page_h,
                stride_page_t, stride_meta_b, stride_meta_h, stride_meta_t,
                BLOCK_SIZE, BLOCK_N, BITS, DH, DOT, False, not INTERPRET, TRANS_QK,
            )  # fmt: skip
            t0 += BLOCK_N
    else:
        for t0 in tl.range(lo, hi, BLOCK_N):
            acc_lo, acc_hi, m_i, l_i = _attend_tile(
                q_lo, q_hi, q_sum, acc_lo, acc_hi, m_i, l_i, t0, hi, qpos, 0, bt_row, h,
                k_page_ptr, v_page_ptr, k_meta_ptr, v_meta_ptr, stride_page_b, stride_page_h,
                stride_page_t, stride_meta_b, stride_meta_h, stride_meta_t,
                BLOCK_SIZE, BLOCK_N, BITS, DH, DOT, False, not INTERPRET, TRANS_QK,
            )  # fmt: skip

    if SINGLE:
        o_rows = s.to(tl.int64) * stride_os + (h * G + g) * stride_oh
        _store_out(out_ptr, o_rows, row_mask, acc_lo, acc_hi, l_i, norm, DH, G_PAD, HAD, False)
    else:
        head = (s * (G * tl.num_programs(0)) + h * G + g).to(tl.int64) * NUM_SPLITS + split
        cols = tl.arange(0, DH)[None, :]
        po = part_o_ptr + head[:, None] * D + cols
        tl.store(po, acc_lo, mask=row_mask[:, None])
        tl.store(po + DH, acc_hi, mask=row_mask[:, None])
        tl.store(part_ml_ptr + head * 2, m_i, mask=row_mask)
        tl.store(part_ml_ptr + head * 2 + 1, l_i, mask=row_mask)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr,  # [S, Hq, NUM_SPLITS, D] fp32
    part_ml_ptr,  # [S, Hq, NUM_SPLITS, 2] fp32
    out_ptr,  # [S, Hq, D]
    norm,
    stride_os,
    stride_oh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    HAD: tl.constexpr,
    ROT_V: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """Merge the splits' softmax states: out = sum_j 2^(m_j - M) o_j / sum_j 2^(m_j - M) l_j."""
    DH: tl.constexpr = D // 2
    h = tl.program_id(0)
    s = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    row_mask = g < G
    head = (s * (G * tl.num_programs(0)) + h * G + g).to(tl.int64) * NUM_SPLITS
    j = tl.arange(0, SPLITS_PAD)
    ml_mask = row_mask[:, None] & (j[None, :] < NUM_SPLITS)
    ml = part_ml_ptr + (head[:, None] + j[None, :]) * 2
    m = tl.load(ml, mask=ml_mask, other=float("-inf"))
    lsum = tl.load(ml + 1, mask=ml_mask, other=0.0)
    m_max = tl.max(m, axis=1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max[:, None])  # [G_PAD, SPLITS_PAD], 0 for empty splits
    l_i = tl.sum(w * lsum, axis=1)
    acc_lo = tl.zeros([G_PAD, DH], tl.float32)
    acc_hi = tl.zeros([G_PAD, DH], tl.float32)
    cols = tl.arange(0, DH)[None, :]
    for split in tl.static_range(NUM_SPLITS):
        wj = tl.sum(tl.where(j[None, :] == split, w, 0.0), axis=1)
        po = part_o_ptr + (head + split)[:, None] * D + cols
        acc_lo += wj[:, None] * tl.load(po, mask=row_mask[:, None], other=0.0)
        acc_hi += wj[:, None] * tl.load(po + DH, mask=row_mask[:, None], other=0.0)
    o_rows = s.to(tl.int64) * stride_os + (h * G + g) * stride_oh
    _store_out(out_ptr, o_rows, row_mask, acc_lo, acc_hi, l_i, norm, DH, G_PAD, HAD, ROT_V)


# ---- extend ------------------------------------------------------------------------------------
@triton.jit
def _extend_kernel(
    q_ptr,  # [T, Hq, D]
    k_page_ptr,
    v_page_ptr,
    k_meta_ptr,
    v_meta_ptr,
    bt_ptr,  # [S, max_blocks] int32
    lens_ptr,  # [S] int32, including the new tokens
    qsl_ptr,  # [S + 1] int32 cumulative query lengths
    out_ptr,  # [T, Hq, D]
    norm,
    qscale,
    window,
    stride_qt,
    stride_qh,
    stride_bt,
    stride_page_b,
    stride_page_h,
    stride_page_t,
    stride_meta_b,
    stride_meta_h,
    stride_meta_t,
    stride_ot,
    stride_oh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    HAD: tl.constexpr,
    ROT_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT: tl.constexpr,
    INTERPRET: tl.constexpr,
    TRANS_QK: tl.constexpr,
):
    """Rows are (query token, head) pairs: row r is token r // G_PAD, head r % G_PAD."""
    DH: tl.constexpr = D // 2
    BLOCK_Q: tl.constexpr = BLOCK_R // G_PAD
    qt = tl.program_id(0)
    s = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_start
    if qt * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(lens_ptr + s)
    ctx = seq_len - q_len
    r = tl.arange(0, BLOCK_R)
    i = qt * BLOCK_Q + r // G_PAD
    g = r % G_PAD
    row_mask = (i < q_len) & (g < G)
    qpos = ctx + i
    q_rows = (q_start + i).to(tl.int64) * stride_qt + (h * G + g) * stride_qh
    q_lo, q_hi, q_sum = _load_query(q_ptr, q_rows, row_mask, norm, qscale, DH, BLOCK_R, HAD, DOT)

    # positions any row of this program may see: causal up to its last token, window below
    hi = tl.minimum(seq_len, ctx + qt * BLOCK_Q + BLOCK_Q)
    lo = seq_len * 0
    if window > 0:
        lo = tl.maximum(ctx + qt * BLOCK_Q - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc_lo = tl.zeros([BLOCK_R, DH], tl.float32)
    acc_hi = tl.zeros([BLOCK_R, DH], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    if INTERPRET:
        t0 = lo
        while t0 < hi:
            acc_lo, acc_hi, m_i, l_i = _attend_tile(
                q_lo, q_hi, q_sum, acc_lo, acc_hi, m_i, l_i, t0, hi, qpos, window, bt_row, h,
                k_page_ptr, v_page_ptr, k_meta_ptr, v_meta_ptr, stride_page_b, stride_page_h,
                stride_page_t, stride_meta_b, stride_meta_h, stride_meta_t,
                BLOCK_SIZE, BLOCK_N, BITS, DH, DOT, True, not INTERPRET, TRANS_QK,
            )  # fmt: skip
            t0 += BLOCK_N
    else:
        for t0 in tl.range(lo, hi, BLOCK_N):
            acc_lo, acc_hi, m_i, l_i = _attend_tile(
                q_lo, q_hi, q_sum, acc_lo, acc_hi, m_i, l_i, t0, hi, qpos, window, bt_row, h,
                k_page_ptr, v_page_ptr, k_meta_ptr, v_meta_ptr, stride_page_b, stride_page_h,
                stride_page_t, stride_meta_b, stride_meta_h, stride_meta_t,
                BLOCK_SIZE, BLOCK_N, BITS, DH, DOT, True, not INTERPRET, TRANS_QK,
            )  # fmt: skip
    o_rows = (q_start + i).to(tl.int64) * stride_ot + (h * G + g) * stride_oh
    # the output rotation (ROT_V) runs in _rotate_rows_kernel: here it would cost occupancy
    _store_out(out_ptr, o_rows, row_mask, acc_lo, acc_hi, l_i, norm, DH, BLOCK_R, HAD, False)


@triton.jit
def _rotate_rows_kernel(
    x_ptr,  # [num_rows, D] fp32 un-rotated attention output
    out_ptr,  # [num_rows, D] output dtype
    num_rows,
    norm,
    D: tl.constexpr,
    HAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """out = R x for rows of head vectors: the once-per-output rotation back with -kv."""
    DH: tl.constexpr = D // 2
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    mask = (rows < num_rows)[:, None]
    off = rows.to(tl.int64)[:, None] * D + tl.arange(0, DH)[None, :]
    lo = tl.load(x_ptr + off, mask=mask, other=0.0)
    hi = tl.load(x_ptr + off + DH, mask=mask, other=0.0)
    lo, hi = rotate_halves(lo, hi, norm, BLOCK_ROWS, DH, HAD, ROT_PREC)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + off, lo.to(ty), mask=mask)
    tl.store(out_ptr + off + DH, hi.to(ty), mask=mask)


# ---- launchers ---------------------------------------------------------------------------------
_DOT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dot_code(q_dtype: torch.dtype, bits: int) -> int:
    """Product dtype: the page dtype for float pages; fp16 for codes (exact integers < 2048,
    the cheap magic-number conversion, and 3 more mantissa bits than bf16 for the query),
    unless q is fp32, which keeps fp32 products."""
    if bits == 16 or q_dtype == torch.float32:
        return _DOT_CODES[q_dtype]
    return 1


_SM_COUNT: dict[int, int] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _common_checks(q, head_dim, bits, had_block, rotate_v, k_cache, block_tables, config):
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"paged attention needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}"
        )
    if head_dim not in (64, 128, 256):
        raise ValueError(f"head_dim must be 64, 128 or 256 for the Triton kernels, got {head_dim}")
    if rotate_v and not had_block:
        raise ValueError("rotate_v needs had_block > 0")
    if q.stride(-1) != 1:
        raise ValueError(f"q must be contiguous in its last dim, got strides {q.stride()}")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables must be contiguous in its last dim")
    if bits == 16 and k_cache.dtype != q.dtype:
        raise ValueError(f"float pages ({k_cache.dtype}) must have q's dtype ({q.dtype})")
    bn = config.block_n
    if bn < 16 or bn & (bn - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {bn}")


def _launch_extra(config: KernelConfig, head_dim: int) -> dict:
    """Register cap for the decode kernel (not understood by the interpreter)."""
    if _interpreting():
        return {}
    cap = config.maxnreg if config.maxnreg is not None else (128 if head_dim <= 128 else None)
    return {} if cap is None else {"maxnreg": cap}


def _meta_args(k_cache, v_cache, k_meta, v_meta):
    if k_meta is None:
        return k_cache, v_cache, (0, 0, 0)
    return k_meta, v_meta, k_meta.stride()[:3]


def _pick_splits(config, num_seqs, num_kv_heads, max_tokens, device) -> int:
    if config.num_splits > 0:
        return config.num_splits
    # enough programs for ~2 waves of the SMs, but every split keeps >= 4 tiles of work.
    # (Known: at B=8, L=32K this gives 320 programs for 264 slots, a partial second wave; a
    # whole-waves choice is the obvious fix but was not measured before the device time ran out.)
    programs = max(1, num_seqs * num_kv_heads)
    want = triton.cdiv(2 * _sm_count(device), programs)
    most = max(1, max_tokens // (4 * config.block_n))
    return max(1, min(want, most, 64))


def paged_attention_decode(
    q,
    k_cache,
    v_cache,
    k_meta,
    v_meta,
    block_tables,
    seq_lens,
    *,
    scale,
    bits,
    had_block,
    rotate_v,
    sliding_window=0,
    out=None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Decode attention, one query token per sequence, over the paged cache.

    Args:
        q: ``[num_seqs, num_q_heads, head_dim]`` bf16/fp16/fp32 in model space (un-rotated).
        k_cache, v_cache: ``[num_blocks, num_kv_heads, block_size, P]`` (uint8 codes for bits 4/8,
            q's dtype for bits=16); k_meta, v_meta ``[num_blocks, num_kv_heads, block_size, 2]``
            fp16 or None for bits=16.
        block_tables: ``[num_seqs, max_blocks]`` int32. seq_lens: ``[num_seqs]`` int32, context
            length including the current token (already written).
        scale: softmax scale. bits: 4, 8 or 16. had_block: 0 or the Hadamard block.
        rotate_v: values stored rotated (output rotated back). sliding_window: > 0 keeps only the
            last that many positions. out: optional ``[num_seqs, num_q_heads, head_dim]`` q.dtype.
        config: tile/launch knobs (:class:`KernelConfig`); ``num_splits=0`` picks from the
            SM count and ``max_blocks`` (no host sync on ``seq_lens``).
    Returns:
        ``[num_seqs, num_q_heads, head_dim]`` in ``q.dtype``.
    """
    num_q_heads, num_kv_heads, block_size, head_dim, num_seqs = check_attention_inputs(
        q, k_cache, v_cache, k_meta, v_meta, block_tables, seq_lens, bits, had_block, sliding_window
    )
    config = config or (DECODE_CONFIG if q.shape[-1] <= 128 else DECODE_CONFIG_D256)
    _common_checks(q, head_dim, bits, had_block, rotate_v, k_cache, block_tables, config)
    if q.shape[0] != num_seqs:
        raise ValueError(f"q has {q.shape[0]} tokens but there are {num_seqs} sequences (decode)")
    check_out(out, q.shape, q.dtype, q.device)
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    g = num_q_heads // num_kv_heads
    g_pad = max(16, triton.next_power_of_2(g))
    max_tokens = block_tables.shape[1] * block_size
    num_splits = _pick_splits(config, num_seqs, num_kv_heads, max_tokens, q.device)
    single = num_splits == 1 and not (rotate_v and had_block)
    if not single:
        part_o = torch.empty(
            (num_seqs, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_ml = torch.empty(
            (num_seqs, num_q_heads, num_splits, 2), dtype=torch.float32, device=q.device
        )
    else:
        part_o = part_ml = out
    k_meta_arg, v_meta_arg, meta_strides = _meta_args(k_cache, v_cache, k_meta, v_meta)
    norm = 1.0 / math.sqrt(had_block) if had_block else 1.0
    common = dict(G=g, G_PAD=g_pad, D=head_dim, HAD=had_block, ROT_V=bool(rotate_v and had_block))
    _decode_kernel[(num_kv_heads, num_seqs, num_splits)](
        q, k_cache, v_cache, k_meta_arg, v_meta_arg, block_tables, seq_lens, out, part_o, part_ml,
        norm, scale * LOG2E, sliding_window,
        q.stride(0), q.stride(1), block_tables.stride(0), *k_cache.stride()[:3], *meta_strides,
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, BITS=bits, BLOCK_N=config.block_n, NUM_SPLITS=num_splits,
        SINGLE=single, **_launch_extra(config, head_dim),
        DOT=_dot_code(q.dtype, bits), INTERPRET=_interpreting(), TRANS_QK=config.trans_qk,
        num_warps=config.num_warps,
        num_stages=config.num_stages, **common,
    )  # fmt: skip
    if not single:
        _decode_reduce_kernel[(num_kv_heads, num_seqs)](
            part_o, part_ml, out, norm, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
            **common,
        )  # fmt: skip
    return out


def paged_attention_extend(
    q,
    k_cache,
    v_cache,
    k_meta,
    v_meta,
    block_tables,
    seq_lens,
    query_start_loc,
    *,
    scale,
    bits,
    had_block,
    rotate_v,
    sliding_window=0,
    out=None,
    max_query_len: int | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Attention of several new tokens per sequence over the paged cache (chunked prefill).

    ::

        positions  0 ............... seq_len-q_len ......... seq_len-1
                   |<-- cached context -->|<-- new tokens (q_len) -->|

    Query i of sequence s sits at ``seq_len_s - q_len_s + i`` and attends causally to the
    positions <= its own (and > its own - sliding_window when sliding_window > 0). The new
    tokens' K/V must already be in the pages.

    Args:
        q: ``[num_tokens, num_q_heads, head_dim]``, the new tokens of all sequences concatenated.
        seq_lens: ``[num_seqs]`` int32 including the new tokens.
        query_start_loc: ``[num_seqs + 1]`` int32 cumulative query lengths.
        max_query_len: host-side bound on any q_len, to size the grid (default num_tokens).
        Other arguments as in :func:`paged_attention_decode`.
    Returns:
        ``[num_tokens, num_q_heads, head_dim]`` in ``q.dtype``.
    """
    num_q_heads, num_kv_heads, block_size, head_dim, num_seqs = check_attention_inputs(
        q, k_cache, v_cache, k_meta, v_meta, block_tables, seq_lens, bits, had_block, sliding_window
    )
    config = config or EXTEND_CONFIG
    _common_checks(q, head_dim, bits, had_block, rotate_v, k_cache, block_tables, config)
    check_tensor("query_start_loc", query_start_loc, 1, (torch.int32,), q.device)
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"query_start_loc must have num_seqs + 1 = {num_seqs + 1} entries, "
            f"got {query_start_loc.shape[0]}"
        )
    check_out(out, q.shape, q.dtype, q.device)
    out = torch.empty_like(q) if out is None else out
    num_tokens = q.shape[0]
    if num_seqs == 0 or num_tokens == 0:
        return out
    rot_v = bool(rotate_v and had_block)
    # with rotated values the kernel writes fp32 un-rotated rows, rotated back into out below
    dest = torch.empty(q.shape, dtype=torch.float32, device=q.device) if rot_v else out
    g = num_q_heads // num_kv_heads
    g_pad = triton.next_power_of_2(g)
    block_r = max(config.block_r, g_pad, 16)
    block_q = block_r // g_pad
    max_q = num_tokens if max_query_len is None else min(max_query_len, num_tokens)
    k_meta_arg, v_meta_arg, meta_strides = _meta_args(k_cache, v_cache, k_meta, v_meta)
    _extend_kernel[(triton.cdiv(max_q, block_q), num_seqs, num_kv_heads)](
        q, k_cache, v_cache, k_meta_arg, v_meta_arg, block_tables, seq_lens, query_start_loc, dest,
        1.0 / math.sqrt(had_block) if had_block else 1.0, scale * LOG2E, sliding_window,
        q.stride(0), q.stride(1), block_tables.stride(0), *k_cache.stride()[:3], *meta_strides,
        dest.stride(0), dest.stride(1),
        G=g, G_PAD=g_pad, D=head_dim, BLOCK_SIZE=block_size, BITS=bits, HAD=had_block,
        ROT_V=bool(rotate_v and had_block), BLOCK_N=config.block_n, BLOCK_R=block_r,
        DOT=_dot_code(q.dtype, bits), INTERPRET=_interpreting(), TRANS_QK=config.trans_qk,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    if rot_v:
        rows = num_tokens * num_q_heads
        _rotate_rows_kernel[(triton.cdiv(rows, 64),)](
            dest, out, rows, 1.0 / math.sqrt(had_block), D=head_dim, HAD=had_block,
            BLOCK_ROWS=64, num_warps=4,
        )  # fmt: skip
    return out
