"""Paged attention of several new tokens per sequence (chunked prefill, prefix hits), Triton."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sawkv.kernels.checks import check_attention_inputs, check_out, check_tensor
from sawkv.kernels.tiles import (
    EXTEND_CONFIG,
    LOG2E,
    KernelConfig,
    _attend_tile,
    _common_checks,
    _dot_code,
    _interpreting,
    _load_query,
    _meta_args,
    _perm_args,
    _rotate_rows_kernel,
    _store_out,
)

__all__ = ["paged_attention_extend", "EXTEND_CONFIG"]


@triton.jit
def _extend_kernel(
    q_ptr,  # [T, Hq, D]
    k_page_ptr,
    v_page_ptr,
    k_meta_ptr,
    v_meta_ptr,
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
                k_page_ptr, v_page_ptr, k_meta_ptr, v_meta_ptr, k_perm_ptr, v_perm_ptr,
                stride_page_b, stride_page_h, stride_page_t,
                stride_meta_b, stride_meta_h, stride_meta_t,
                BLOCK_SIZE, BLOCK_N, BITS, DH, DOT, True, not INTERPRET, TRANS_QK,
            )  # fmt: skip
            t0 += BLOCK_N
    else:
        for t0 in tl.range(lo, hi, BLOCK_N):
            acc_lo, acc_hi, m_i, l_i = _attend_tile(
                q_lo, q_hi, q_sum, acc_lo, acc_hi, m_i, l_i, t0, hi, qpos, window, bt_row, h,
                k_page_ptr, v_page_ptr, k_meta_ptr, v_meta_ptr, k_perm_ptr, v_perm_ptr,
                stride_page_b, stride_page_h, stride_page_t,
                stride_meta_b, stride_meta_h, stride_meta_t,
                BLOCK_SIZE, BLOCK_N, BITS, DH, DOT, True, not INTERPRET, TRANS_QK,
            )  # fmt: skip
    o_rows = (q_start + i).to(tl.int64) * stride_ot + (h * G + g) * stride_oh
    # the output rotation (ROT_V) runs in _rotate_rows_kernel: here it would cost occupancy
    _store_out(out_ptr, o_rows, row_mask, acc_lo, acc_hi, l_i, norm, DH, BLOCK_R, HAD, False)


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
    seq_lens_host: list[int] | None = None,
    query_start_host: list[int] | None = None,
    impl: str = "auto",
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
        seq_lens_host, query_start_host: host copies of ``seq_lens`` / ``query_start_loc``
            (read from the device, one sync, if None and the SDPA path needs them).
        impl: "auto" dequantizes each sequence once and runs FlashAttention (SDPA) when there
            is no sliding window and q is bf16/fp16 on CUDA (``dequant.py``); "triton" forces
            the fused paged kernel below; "sdpa" forces the former (CPU included).
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
    if impl not in ("auto", "triton", "sdpa"):
        raise ValueError(f"impl must be auto, triton or sdpa, got {impl!r}")
    fast = q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
    if impl == "sdpa" or (impl == "auto" and fast and not sliding_window):
        if sliding_window:
            raise ValueError("the SDPA extend path has no sliding window; use impl='triton'")
        from sawkv.kernels.dequant import extend_via_sdpa

        lens = seq_lens.tolist() if seq_lens_host is None else seq_lens_host
        qsl = query_start_loc.tolist() if query_start_host is None else query_start_host
        return extend_via_sdpa(
            q, k_cache, v_cache, k_meta, v_meta, block_tables, seq_lens, query_start_loc, out,
            scale=scale, bits=bits, had_block=had_block, rotate_v=rotate_v, seq_lens_host=lens,
            query_start_host=qsl,
        )  # fmt: skip
    rot_v = bool(rotate_v and had_block)
    # with rotated values the kernel writes fp32 un-rotated rows, rotated back into out below
    dest = torch.empty(q.shape, dtype=torch.float32, device=q.device) if rot_v else out
    g = num_q_heads // num_kv_heads
    g_pad = triton.next_power_of_2(g)
    block_r = max(config.block_r, g_pad, 16)
    block_q = block_r // g_pad
    max_q = num_tokens if max_query_len is None else min(max_query_len, num_tokens)
    k_meta_arg, v_meta_arg, meta_strides = _meta_args(k_cache, v_cache, k_meta, v_meta)
    k_perm, v_perm = _perm_args(bits, head_dim, q.device)
    _extend_kernel[(triton.cdiv(max_q, block_q), num_seqs, num_kv_heads)](
        q, k_cache, v_cache, k_meta_arg, v_meta_arg, k_perm, v_perm, block_tables, seq_lens,
        query_start_loc, dest,
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
