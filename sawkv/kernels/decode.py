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

from sawkv.kernels.checks import check_attention_inputs, check_out
from sawkv.kernels.tiles import (
    DECODE_CONFIG,
    DECODE_CONFIG_D256,
    LOG2E,
    KernelConfig,
    _attend_tile,
    _common_checks,
    _dot_code,
    _interpreting,
    _launch_extra,
    _load_query,
    _meta_args,
    _perm_args,
    _sm_count,
    _store_out,
)

__all__ = ["paged_attention_decode", "KernelConfig", "DECODE_CONFIG", "DECODE_CONFIG_D256"]


@triton.jit
def _decode_kernel(
    q_ptr,  # [S, Hq, D]
    k_page_ptr,  # [num_blocks, Hkv, block_size, P]
    v_page_ptr,
    k_meta_ptr,  # [num_blocks, Hkv, block_size, 2] fp16 (dummy for BITS=16)
    v_meta_ptr,
    k_perm_ptr,  # [16, P] int32 byte order of a 16-token group (INT4/INT8; page_layout.py)
    v_perm_ptr,
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
                k_page_ptr, v_page_ptr, k_meta_ptr, v_meta_ptr, k_perm_ptr, v_perm_ptr,
                stride_page_b, stride_page_h, stride_page_t,
                stride_meta_b, stride_meta_h, stride_meta_t,
                BLOCK_SIZE, BLOCK_N, BITS, DH, DOT, False, not INTERPRET, TRANS_QK,
            )  # fmt: skip
            t0 += BLOCK_N
    else:
        for t0 in tl.range(lo, hi, BLOCK_N):
            acc_lo, acc_hi, m_i, l_i = _attend_tile(
                q_lo, q_hi, q_sum, acc_lo, acc_hi, m_i, l_i, t0, hi, qpos, 0, bt_row, h,
                k_page_ptr, v_page_ptr, k_meta_ptr, v_meta_ptr, k_perm_ptr, v_perm_ptr,
                stride_page_b, stride_page_h, stride_page_t,
                stride_meta_b, stride_meta_h, stride_meta_t,
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


def _pick_splits(config, num_seqs, num_kv_heads, max_tokens, device) -> int:
    """Splits for the Triton kernel: ~2 waves of programs, every split >= 4 tiles, rounded
    down to a power of two (NUM_SPLITS is a compile-time constant: powers of two keep the
    variants few enough to compile while the decode CUDA graphs are captured)."""
    if config.num_splits > 0:
        return config.num_splits
    programs = max(1, num_seqs * num_kv_heads)
    want = triton.cdiv(2 * _sm_count(device), programs)
    most = max(1, max_tokens // (4 * config.block_n))
    splits = max(1, min(want, most, 64))
    return 1 << (splits.bit_length() - 1)


def _use_cuda(q, bits: int, num_q_heads: int, num_kv_heads: int, impl: str) -> bool:
    if q.device.type != "cuda" or _interpreting():
        if impl == "cuda":
            raise ValueError("config.impl='cuda' needs CUDA tensors")
        return False
    from sawkv.kernels import decode_cuda

    ok = decode_cuda.supports(q, bits, num_q_heads, num_kv_heads)
    if impl == "cuda" and not ok:
        raise ValueError("the CUDA decode kernel serves INT4/INT8 pages, fp16/bf16 q, G <= 16")
    if ok and not decode_cuda.available(q.device):
        if impl == "cuda":
            raise RuntimeError(f"the CUDA decode kernel did not build: {decode_cuda.build_error()}")
        return False
    return ok


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
    if config.impl not in ("auto", "triton", "cuda"):
        raise ValueError(f"config.impl must be auto, triton or cuda, got {config.impl!r}")
    max_tokens = block_tables.shape[1] * block_size
    if config.impl != "triton" and _use_cuda(q, bits, num_q_heads, num_kv_heads, config.impl):
        from sawkv.kernels import decode_cuda

        splits = config.num_splits or decode_cuda.pick_splits(
            num_seqs, num_kv_heads, max_tokens, head_dim, _sm_count(q.device)
        )
        return decode_cuda.paged_decode_cuda(
            q, k_cache, v_cache, k_meta, v_meta, block_tables, seq_lens, out, scale=scale,
            bits=bits, had_block=had_block, rotate_v=rotate_v, sliding_window=sliding_window,
            num_splits=splits, groups_per_step=config.groups_per_step,
        )  # fmt: skip
    g = num_q_heads // num_kv_heads
    g_pad = max(16, triton.next_power_of_2(g))
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
    k_perm, v_perm = _perm_args(bits, head_dim, q.device)
    _decode_kernel[(num_kv_heads, num_seqs, num_splits)](
        q, k_cache, v_cache, k_meta_arg, v_meta_arg, k_perm, v_perm, block_tables, seq_lens, out,
        part_o, part_ml,
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
