"""Paged attention of several new tokens per sequence (chunked prefill, prefix hits), Triton."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sawkv.kernels.checks import check_out, check_pages
from sawkv.kernels.launch import (
    EXTEND_CONFIG,
    KernelConfig,
    _dot_code,
    _interpreting,
    _meta_args,
    _perm_args,
)
from sawkv.kernels.page_format import KVPages, PageFormat
from sawkv.kernels.plan import ExtendPlan, plan_extend
from sawkv.kernels.rotation import rotate_cast
from sawkv.kernels.sinks import SinkKV
from sawkv.kernels.tiles import LOG2E, _attend_tile, _load_query, _store_out

__all__ = ["paged_attention_extend", "EXTEND_CONFIG"]


@triton.jit
def _extend_kernel(
    q_ptr,  # [T, Hq, D]
    k_page_ptr,
    v_page_ptr,
    k_meta_ptr,  # [num_blocks, Hkv, block_size, 2 | 4 (K_HALF)] fp16 (dummy for BITS=16)
    v_meta_ptr,  # [num_blocks, Hkv, block_size, 2] fp16
    k_perm_ptr,  # [16, P] int32 byte order of a 16-token group (INT4/INT8; page_layout.py)
    v_perm_ptr,
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
    stride_meta_b,  # v_meta's (k_meta's offsets follow: tiles._k_meta_rows)
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
    K_HALF: tl.constexpr,
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
    q_lo, q_hi, q_sum, q_sum_lo, q_sum_hi = _load_query(
        q_ptr, q_rows, row_mask, norm, qscale, DH, BLOCK_R, HAD, DOT
    )

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
                q_lo, q_hi, q_sum, q_sum_lo, q_sum_hi, acc_lo, acc_hi, m_i, l_i, t0, hi, qpos,
                window, bt_row, h,
                k_page_ptr, v_page_ptr, k_meta_ptr, v_meta_ptr, k_perm_ptr, v_perm_ptr,
                stride_page_b, stride_page_h, stride_page_t,
                stride_meta_b, stride_meta_h, stride_meta_t,
                BLOCK_SIZE, BLOCK_N, BITS, DH, DOT, True, not INTERPRET, TRANS_QK, K_HALF,
            )  # fmt: skip
            t0 += BLOCK_N
    else:
        for t0 in tl.range(lo, hi, BLOCK_N):
            acc_lo, acc_hi, m_i, l_i = _attend_tile(
                q_lo, q_hi, q_sum, q_sum_lo, q_sum_hi, acc_lo, acc_hi, m_i, l_i, t0, hi, qpos,
                window, bt_row, h,
                k_page_ptr, v_page_ptr, k_meta_ptr, v_meta_ptr, k_perm_ptr, v_perm_ptr,
                stride_page_b, stride_page_h, stride_page_t,
                stride_meta_b, stride_meta_h, stride_meta_t,
                BLOCK_SIZE, BLOCK_N, BITS, DH, DOT, True, not INTERPRET, TRANS_QK, K_HALF,
            )  # fmt: skip
    o_rows = (q_start + i).to(tl.int64) * stride_ot + (h * G + g) * stride_oh
    # the output rotation (ROT_V) runs in rotation.rotate_cast: here it would cost occupancy
    _store_out(out_ptr, o_rows, row_mask, acc_lo, acc_hi, l_i, norm, DH, BLOCK_R, HAD, False)


def paged_attention_extend(
    q: torch.Tensor,
    pages: KVPages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    fmt: PageFormat,
    *,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    impl: str = "auto",
    max_query_len: int | None = None,
    seq_lens_host: list[int] | None = None,
    query_start_host: list[int] | None = None,
    plan: ExtendPlan | None = None,
    sinks: SinkKV | None = None,
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
        config, impl, max_query_len, seq_lens_host, query_start_host: see
            :func:`sawkv.kernels.plan.plan_extend` (ignored with ``plan``); impl "auto"
            dequantizes each sequence once and runs FlashAttention (SDPA) for bf16/fp16 q on
            CUDA (``dequant.py``), else runs the fused kernel below.
        plan: an :class:`ExtendPlan` for this step's shapes and ``fmt`` (skips checks and
            allocations); None plans here.
        sinks: exact K/V of each sequence's first positions
            (:class:`~sawkv.kernels.sinks.SinkKV`), read instead of the pages' quantized rows;
            served by the SDPA path only.
        Other arguments as in :func:`paged_attention_decode`.
    Returns:
        ``[num_tokens, num_q_heads, head_dim]`` in ``q.dtype``.
    """
    if plan is None:
        check_pages(pages, fmt, q.device)
        check_out(out, q.shape, q.dtype, q.device)
        plan = plan_extend(
            q, block_tables, seq_lens, query_start_loc, fmt, sliding_window=sliding_window,
            max_query_len=max_query_len, seq_lens_host=seq_lens_host,
            query_start_host=query_start_host, config=config, impl=impl,
            num_sink=0 if sinks is None else sinks.num_sink,
        )  # fmt: skip
    elif plan.num_tokens != q.shape[0] or plan.fmt != fmt:
        raise ValueError("the extend plan was made for another step shape or page format")
    out = torch.empty_like(q) if out is None else out
    if sinks is not None and plan.impl != "sdpa":
        raise ValueError(
            f"attention sinks are served by the SDPA extend path only; this plan uses {plan.impl!r}"
        )
    if plan.num_seqs == 0 or plan.num_tokens == 0:
        return out
    if plan.impl == "sdpa":
        from sawkv.kernels.dequant import extend_via_sdpa

        return extend_via_sdpa(
            q, pages, block_tables, seq_lens, query_start_loc, out, fmt, scale=scale,
            plan=plan.sdpa, sinks=sinks, sliding_window=sliding_window,
        )  # fmt: skip
    _launch_triton(q, pages, block_tables, seq_lens, query_start_loc, fmt, scale, sliding_window,
                   out, plan)  # fmt: skip
    return out


def _launch_triton(q, pages, block_tables, seq_lens, qsl, fmt, scale, sliding_window, out, plan):
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, had_block, config = fmt.num_kv_heads, fmt.had_block, plan.config
    dest = out if plan.rotated is None else plan.rotated
    g = num_q_heads // num_kv_heads
    g_pad = triton.next_power_of_2(g)
    block_r = max(config.block_r, g_pad, 16)
    block_q = block_r // g_pad
    k_meta_arg, v_meta_arg, meta_strides = _meta_args(pages)
    k_perm, v_perm = _perm_args(fmt.bits, head_dim, q.device)
    k_cache, v_cache = pages[0], pages[1]
    _extend_kernel[(triton.cdiv(plan.max_query_len, block_q), plan.num_seqs, num_kv_heads)](
        q, k_cache, v_cache, k_meta_arg, v_meta_arg, k_perm, v_perm, block_tables, seq_lens,
        qsl, dest,
        1.0 / math.sqrt(had_block) if had_block else 1.0, scale * LOG2E, sliding_window,
        q.stride(0), q.stride(1), block_tables.stride(0), *k_cache.stride()[:3], *meta_strides,
        dest.stride(0), dest.stride(1),
        G=g, G_PAD=g_pad, D=head_dim, BLOCK_SIZE=fmt.block_size, BITS=fmt.bits, HAD=had_block,
        ROT_V=fmt.rotate_v, BLOCK_N=config.block_n, BLOCK_R=block_r,
        DOT=_dot_code(q.dtype, fmt.bits), INTERPRET=_interpreting(), TRANS_QK=config.trans_qk,
        K_HALF=fmt.k_half_meta,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    if plan.rotated is not None:
        rotate_cast(dest, had_block, out)
