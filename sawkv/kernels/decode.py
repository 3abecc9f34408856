"""Split-K paged decode over INT4 / INT8 / float pages (FlashDecoding), Triton.

Decode splits each sequence into ``num_splits`` ranges (one program each) and a second kernel
merges the partial softmax states, so one long sequence still fills the GPU. With one split (and
no value rotation) the first kernel finishes the output itself. On CUDA, INT4/INT8 pages go to
the CUDA kernel of ``decode_cuda.py`` when it builds; this kernel is the fallback and what the
CPU interpreter tests run.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sawkv.kernels.checks import check_out, check_pages
from sawkv.kernels.launch import (
    DECODE_CONFIG,
    DECODE_CONFIG_D256,
    KernelConfig,
    _dot_code,
    _interpreting,
    _launch_extra,
    _meta_args,
    _perm_args,
)
from sawkv.kernels.page_format import KVPages, PageFormat
from sawkv.kernels.plan import DecodePlan, plan_decode
from sawkv.kernels.sinks import SinkKV, merge_sinks
from sawkv.kernels.tiles import LOG2E, _attend_tile, _load_query, _store_out

# a Triton global must be a tl.constexpr to be read inside @jit code (the interpreter does not
# check; the compiler does: tests/gpu_compile)
LN2 = tl.constexpr(0.6931471805599453)

__all__ = ["paged_attention_decode", "KernelConfig", "DECODE_CONFIG", "DECODE_CONFIG_D256"]


@triton.jit
def _lse(m, l_sum):
    """Natural log-sum-exp from a running max in log2 units and a sum of 2^(s - m); -inf where
    nothing was attended."""
    ok = l_sum > 0
    return tl.where(ok, (m + tl.log2(tl.where(ok, l_sum, 1.0))) * LN2, float("-inf"))


@triton.jit
def _decode_kernel(
    q_ptr,  # [S, Hq, D]
    k_page_ptr,  # [num_blocks, Hkv, block_size, P]
    v_page_ptr,
    k_meta_ptr,  # [num_blocks, Hkv, block_size, 2 | 4 (K_HALF)] fp16 (dummy for BITS=16)
    v_meta_ptr,  # [num_blocks, Hkv, block_size, 2] fp16
    k_perm_ptr,  # [16, P] int32 byte order of a 16-token group (INT4/INT8; page_layout.py)
    v_perm_ptr,
    bt_ptr,  # [S, max_blocks] int32
    lens_ptr,  # [S] int32
    out_ptr,  # [S, Hq, D] (SINGLE)
    part_o_ptr,  # [S, Hq, NUM_SPLITS, D] fp32 unnormalized partial outputs (not SINGLE)
    part_ml_ptr,  # [S, Hq, NUM_SPLITS, 2] fp32 (running max in log2 units, sum of weights)
    lse_ptr,  # [S, Hq] fp32 natural log-sum-exp of the scaled scores (WRITE_LSE)
    norm,
    qscale,
    window,
    first,
    stride_qs,
    stride_qh,
    stride_bt,
    stride_page_b,
    stride_page_h,
    stride_page_t,
    stride_meta_b,  # v_meta's (k_meta's offsets follow: tiles._k_meta_rows)
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
    K_HALF: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """Positions below ``first`` are not attended (attention sinks read elsewhere).

    SINGLE: one split and no output rotation, so this kernel writes ``out`` itself. Otherwise
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
    start = tl.minimum(tl.maximum(start, first), seq_len)
    # this split's range of positions, whole tiles, relative to the window start
    # (tl.cdiv on scalars yields a 1-element tensor under the interpreter; spell it out)
    per_split = (seq_len - start + NUM_SPLITS - 1) // NUM_SPLITS
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(seq_len, lo + chunk)

    g = tl.arange(0, G_PAD)
    row_mask = g < G
    q_rows = s.to(tl.int64) * stride_qs + (h * G + g) * stride_qh
    q_lo, q_hi, q_sum, q_sum_lo, q_sum_hi = _load_query(
        q_ptr, q_rows, row_mask, norm, qscale, DH, G_PAD, HAD, DOT
    )

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
                q_lo, q_hi, q_sum, q_sum_lo, q_sum_hi, acc_lo, acc_hi, m_i, l_i, t0, hi, qpos,
                0, bt_row, h,
                k_page_ptr, v_page_ptr, k_meta_ptr, v_meta_ptr, k_perm_ptr, v_perm_ptr,
                stride_page_b, stride_page_h, stride_page_t,
                stride_meta_b, stride_meta_h, stride_meta_t,
                BLOCK_SIZE, BLOCK_N, BITS, DH, DOT, False, not INTERPRET, TRANS_QK, K_HALF,
            )  # fmt: skip
            t0 += BLOCK_N
    else:
        for t0 in tl.range(lo, hi, BLOCK_N):
            acc_lo, acc_hi, m_i, l_i = _attend_tile(
                q_lo, q_hi, q_sum, q_sum_lo, q_sum_hi, acc_lo, acc_hi, m_i, l_i, t0, hi, qpos,
                0, bt_row, h,
                k_page_ptr, v_page_ptr, k_meta_ptr, v_meta_ptr, k_perm_ptr, v_perm_ptr,
                stride_page_b, stride_page_h, stride_page_t,
                stride_meta_b, stride_meta_h, stride_meta_t,
                BLOCK_SIZE, BLOCK_N, BITS, DH, DOT, False, not INTERPRET, TRANS_QK, K_HALF,
            )  # fmt: skip

    if SINGLE:
        o_rows = s.to(tl.int64) * stride_os + (h * G + g) * stride_oh
        _store_out(out_ptr, o_rows, row_mask, acc_lo, acc_hi, l_i, norm, DH, G_PAD, HAD, False)
        if WRITE_LSE:
            tl.store(lse_ptr + s * (G * tl.num_programs(0)) + h * G + g,
                     _lse(m_i, l_i), mask=row_mask)  # fmt: skip
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
    lse_ptr,  # [S, Hq] fp32 (WRITE_LSE)
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
    WRITE_LSE: tl.constexpr,
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
    if WRITE_LSE:
        tl.store(lse_ptr + s * (G * tl.num_programs(0)) + h * G + g,
                 _lse(m_max, l_i), mask=row_mask)  # fmt: skip


def paged_attention_decode(
    q: torch.Tensor,
    pages: KVPages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    fmt: PageFormat,
    *,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    plan: DecodePlan | None = None,
    sinks: SinkKV | None = None,
) -> torch.Tensor:
    """Decode attention, one query token per sequence, over the paged cache.

    Args:
        q: ``[num_seqs, num_q_heads, head_dim]`` bf16/fp16/fp32 in model space (un-rotated).
        pages: :class:`KVPages` ``(k_cache, v_cache, k_meta, v_meta)`` of one layer in format
            ``fmt`` (``page_format.py``; float pages must have q's dtype).
        block_tables: ``[num_seqs, max_blocks]`` int32. seq_lens: ``[num_seqs]`` int32, context
            length including the current token (already written).
        fmt: the pages' :class:`PageFormat` (bits, had_block, rotate_v: values stored rotated,
            the output is rotated back).
        scale: softmax scale. sliding_window: > 0 keeps only the last that many positions.
        out: optional ``[num_seqs, num_q_heads, head_dim]`` q.dtype.
        config: tile/launch knobs (:class:`KernelConfig`); ``num_splits=0`` picks from the
            SM count and ``max_blocks`` (no host sync on ``seq_lens``). Ignored with ``plan``.
        plan: a :class:`DecodePlan` from :func:`sawkv.kernels.plan.plan_decode` for this
            step's q shape, block tables and ``fmt``: the launch then skips every check and
            allocation (the pages were checked when allocated). None plans here.
        sinks: exact K/V of each sequence's first ``sinks.num_sink`` positions
            (:class:`~sawkv.kernels.sinks.SinkKV`): the kernel attends from that position on
            and :func:`~sawkv.kernels.sinks.merge_sinks` adds the exact terms. None reads every
            position from the pages.
    Returns:
        ``[num_seqs, num_q_heads, head_dim]`` in ``q.dtype``.

    Example::

        fmt = PageFormat(bits=4, head_dim=128, num_kv_heads=8, block_size=16, had_block=128)
        out = paged_attention_decode(q, pages, block_tables, seq_lens, fmt, scale=128**-0.5)
    """
    if plan is None:
        check_pages(pages, fmt, q.device)
        check_out(out, q.shape, q.dtype, q.device)
        plan = plan_decode(
            q, block_tables, seq_lens, fmt, sliding_window=sliding_window, config=config
        )
    elif plan.num_seqs != q.shape[0] or plan.fmt != fmt:
        raise ValueError("the decode plan was made for another step shape or page format")
    out = torch.empty_like(q) if out is None else out
    if plan.num_seqs == 0:
        return out
    first, lse = 0, None
    if sinks is not None:
        if plan.lse is None:
            sinks.check(plan.num_seqs, fmt)
            plan.lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        first, lse = sinks.num_sink, plan.lse
    if plan.impl == "cuda":
        from sawkv.kernels import decode_cuda

        decode_cuda.paged_decode_cuda(
            q, pages, block_tables, seq_lens, out, fmt, scale=scale,
            sliding_window=sliding_window, num_splits=plan.num_splits,
            groups_per_step=plan.config.groups_per_step,
            single_split_tokens=plan.config.single_split_tokens,
            cta_warps=plan.config.cta_warps, part_o=plan.part_o,
            part_ml=plan.part_ml, first=first, lse=lse,
        )  # fmt: skip
    else:
        _launch_triton(q, pages, block_tables, seq_lens, fmt, scale, sliding_window, out, plan,
                       first, lse)  # fmt: skip
    if sinks is not None:
        merge_sinks(q, out, lse, sinks, seq_lens, scale=scale, sliding_window=sliding_window,
                    out=out)  # fmt: skip
    return out


def _launch_triton(
    q, pages, block_tables, seq_lens, fmt, scale, sliding_window, out, plan, first=0, lse=None
):
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, had_block, config = fmt.num_kv_heads, fmt.had_block, plan.config
    g = num_q_heads // num_kv_heads
    g_pad = max(16, triton.next_power_of_2(g))
    num_splits = plan.num_splits
    single = plan.part_o is None
    part_o, part_ml = (out, out) if single else (plan.part_o, plan.part_ml)
    k_meta_arg, v_meta_arg, meta_strides = _meta_args(pages)
    norm = 1.0 / math.sqrt(had_block) if had_block else 1.0
    common = dict(G=g, G_PAD=g_pad, D=head_dim, HAD=had_block, ROT_V=fmt.rotate_v)
    k_perm, v_perm = _perm_args(fmt.bits, head_dim, q.device)
    k_cache, v_cache = pages[0], pages[1]
    write_lse = lse is not None
    lse_arg = lse if write_lse else part_ml
    _decode_kernel[(num_kv_heads, num_seqs, num_splits)](
        q, k_cache, v_cache, k_meta_arg, v_meta_arg, k_perm, v_perm, block_tables, seq_lens, out,
        part_o, part_ml, lse_arg,
        norm, scale * LOG2E, sliding_window, first,
        q.stride(0), q.stride(1), block_tables.stride(0), *k_cache.stride()[:3], *meta_strides,
        out.stride(0), out.stride(1),
        BLOCK_SIZE=fmt.block_size, BITS=fmt.bits, BLOCK_N=config.block_n, NUM_SPLITS=num_splits,
        SINGLE=single, **_launch_extra(config, head_dim),
        DOT=_dot_code(q.dtype, fmt.bits), INTERPRET=_interpreting(), TRANS_QK=config.trans_qk,
        K_HALF=fmt.k_half_meta,
        WRITE_LSE=write_lse, num_warps=config.num_warps,
        num_stages=config.num_stages, **common,
    )  # fmt: skip
    if not single:
        _decode_reduce_kernel[(num_kv_heads, num_seqs)](
            part_o, part_ml, out, lse_arg, norm, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
            WRITE_LSE=write_lse, num_warps=4,
            **common,
        )  # fmt: skip
