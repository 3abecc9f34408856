"""Dequantize sequences' pages into contiguous K/V rows (the prefill / extend path).

Prefill is compute-bound: attention over a chunk of new tokens does ``2 * q_len`` FLOPs per
cached byte, so decoding INT4 inside the attention loop (as the decode kernel does) only adds
instructions where the tensor cores are the limit. Instead each sequence's K and V are
dequantized once into a contiguous buffer (reading the pages once, writing bf16/fp16 rows, ~3%
of a 2K-token chunk's attention time) and attention runs in torch's FlashAttention-2 SDPA.
The chunk attends through the quantized pages (its own new tokens included, already written),
so a request's numerics do not depend on how its prompt was chunked.

One program dequantizes one 16-token group of one KV head: it reads the group's bytes (a
contiguous run in the fragment order of ``page_layout.py``) through the ``[16, P]`` byte table
and writes 16 whole rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sawkv.kernels.launch import _interpreting, _perm_args
from sawkv.kernels.page_format import KVPages, PageFormat
from sawkv.kernels.rotation import rotate_cast
from sawkv.kernels.sinks import SinkKV


@triton.jit
def _dequant_kernel(
    page_ptr,  # [num_blocks, H, block_size, P] uint8 codes or float rows
    meta_ptr,  # [num_blocks, H, block_size, 2] fp16 (scale, min), [..., 4] (HALF); dummy for 16
    perm_ptr,  # [16, P] int32 byte order of a group (INT4/INT8)
    bt_ptr,  # [S, max_blocks] int32
    lens_ptr,  # [S] int32
    start_ptr,  # [S + 1] int32 first output row of each sequence
    out_ptr,  # [total_rows, H, D] output dtype
    stride_bt,
    stride_page_b,
    stride_page_h,
    stride_meta_b,
    stride_meta_h,
    stride_out_t,
    stride_out_h,
    BLOCK_SIZE: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    HALF: tl.constexpr,  # (scale_lo, min_lo, scale_hi, min_hi) per row: k_half_meta keys
):
    DH: tl.constexpr = D // 2
    grp = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(lens_ptr + s)
    if grp * 16 >= seq_len:
        return
    pos = grp * 16 + tl.arange(0, 16)
    ok = pos < seq_len
    page = tl.load(bt_ptr + s.to(tl.int64) * stride_bt + (grp * 16) // BLOCK_SIZE).to(tl.int64)
    in_page = (grp * 16) % BLOCK_SIZE
    cols = tl.arange(0, DH)[None, :]
    o = tl.arange(0, 16)[:, None]
    base = page * stride_page_b + h * stride_page_h
    if BITS == 16:
        rows = page_ptr + base + (in_page + o) * D + cols
        lo = tl.load(rows, mask=ok[:, None], other=0.0).to(tl.float32)
        hi = tl.load(rows + DH, mask=ok[:, None], other=0.0).to(tl.float32)
    else:
        group = page_ptr + base + in_page * (DH if BITS == 4 else D)
        p_row: tl.constexpr = DH if BITS == 4 else D
        if BITS == 4:
            b = tl.load(group + tl.load(perm_ptr + o * p_row + cols), mask=ok[:, None], other=0)
            lo, hi = (b & 0xF).to(tl.float32), (b >> 4).to(tl.float32)
        else:
            lo = tl.load(group + tl.load(perm_ptr + o * p_row + cols), mask=ok[:, None], other=0)
            hi = tl.load(group + tl.load(perm_ptr + o * p_row + DH + cols), mask=ok[:, None],
                         other=0)  # fmt: skip
            lo, hi = lo.to(tl.float32), hi.to(tl.float32)
        if HALF:
            meta = meta_ptr + page * stride_meta_b + h * stride_meta_h + (in_page + o) * 4
            s_lo = tl.load(meta, mask=ok[:, None], other=0.0).to(tl.float32)
            m_lo = tl.load(meta + 1, mask=ok[:, None], other=0.0).to(tl.float32)
            s_hi = tl.load(meta + 2, mask=ok[:, None], other=0.0).to(tl.float32)
            m_hi = tl.load(meta + 3, mask=ok[:, None], other=0.0).to(tl.float32)
        else:
            meta = meta_ptr + page * stride_meta_b + h * stride_meta_h + (in_page + o) * 2
            s_lo = tl.load(meta, mask=ok[:, None], other=0.0).to(tl.float32)
            m_lo = tl.load(meta + 1, mask=ok[:, None], other=0.0).to(tl.float32)
            s_hi, m_hi = s_lo, m_lo
        lo = tl.minimum(tl.maximum(lo * s_lo + m_lo, -65504.0), 65504.0)
        hi = tl.minimum(tl.maximum(hi * s_hi + m_hi, -65504.0), 65504.0)
    start = tl.load(start_ptr + s)
    dest = out_ptr + (start + pos).to(tl.int64)[:, None] * stride_out_t + h * stride_out_h + cols
    ty = out_ptr.dtype.element_ty
    tl.store(dest, lo.to(ty), mask=ok[:, None])
    tl.store(dest + DH, hi.to(ty), mask=ok[:, None])


def dequant_pages(
    cache: torch.Tensor,
    meta: torch.Tensor | None,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    row_starts: torch.Tensor,
    out: torch.Tensor,
    fmt: PageFormat,
    *,
    is_key: bool,
    max_seq_len: int,
) -> torch.Tensor:
    """K or V of every sequence's first ``seq_len`` positions as contiguous rows.

    Args:
        cache: ``[num_blocks, H, block_size, P]`` one layer's K or V pages; meta its
            ``[num_blocks, H, block_size, 2]`` fp16 (scale, min) (keys of a ``k_half_meta``
            format: ``[..., 4]``, a pair per half), None for bits=16.
        block_tables: ``[S, max_blocks]`` int32. seq_lens: ``[S]`` int32.
        row_starts: ``[S + 1]`` int32, first row of each sequence in ``out``.
        out: ``[total_rows, H, head_dim]`` bf16/fp16/fp32, written in place.
        fmt: the pages' format. is_key: which byte order (keys and values differ).
        max_seq_len: host-side bound on ``seq_lens`` (sizes the grid).
    Returns:
        ``out``; rows hold ``code * scale + min`` (rotated/centered as stored).
    """
    if cache.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"dequant_pages needs CUDA tensors (or TRITON_INTERPRET=1), got {cache.device}"
        )
    num_seqs = block_tables.shape[0]
    head_dim, bits = fmt.head_dim, fmt.bits
    if num_seqs == 0 or max_seq_len == 0:
        return out
    k_perm, v_perm = _perm_args(bits, head_dim, cache.device)
    meta_arg = cache if meta is None else meta
    meta_strides = (0, 0) if meta is None else meta.stride()[:2]
    grid = (triton.cdiv(max_seq_len, 16), cache.shape[1], num_seqs)
    _dequant_kernel[grid](
        cache, meta_arg, k_perm if is_key else v_perm, block_tables, seq_lens, row_starts, out,
        block_tables.stride(0), *cache.stride()[:2], *meta_strides, out.stride(0), out.stride(1),
        BLOCK_SIZE=cache.shape[2], D=head_dim, BITS=bits, HALF=is_key and fmt.k_half_meta,
        num_warps=4,
    )  # fmt: skip
    return out


@dataclass
class SdpaPlan:
    """Host copies and workspaces of the SDPA extend path, shared by a step's layers.

    ``starts`` ``[num_seqs + 1]`` first K/V row of each sequence (host list; ``row_starts`` its
    device copy); ``query_start_host`` the host ``query_start_loc``; ``kbuf, vbuf
    [starts[-1], num_kv_heads, head_dim]`` the dequantized K/V rows and ``qbuf [T, Hq, d]`` the
    rotated (or cast) queries, None where q is used as it is (all overwritten by each layer).
    """

    starts: list[int]
    query_start_host: list[int]
    max_seq_len: int
    max_query_len: int
    row_starts: torch.Tensor
    kbuf: torch.Tensor
    vbuf: torch.Tensor
    # attention sinks: K/V rows to overwrite (``[n]`` int64 device) and where each comes from
    # in the step's flattened ``[S * num_sink]`` sinks
    sink_dst: torch.Tensor | None = None
    sink_src: torch.Tensor | None = None
    qbuf: torch.Tensor | None = None


def plan_sdpa(
    q: torch.Tensor,
    fmt: PageFormat,
    seq_lens_host: list[int],
    query_start_host: list[int],
    num_sink: int = 0,
) -> SdpaPlan:
    """Row offsets and K/V workspaces for :func:`extend_via_sdpa` (``q [T, Hq, d]``);
    ``num_sink`` > 0 also plans which rows the attention sinks overwrite."""
    starts = [0]
    for n in seq_lens_host:
        starts.append(starts[-1] + n)
    # Codes dequantize into fp16, not bf16, when q is 16-bit: 3 more mantissa bits keep the
    # attention within 5e-3 of the fp32 reference (bf16 rows measured 5.2e-3 at 5K tokens).
    # The writer clamps values to +-65504 before quantizing, so rows fit fp16 (the kernel
    # clamps again for the rounding of scale and min); q is clamped to fp16's range.
    work = torch.float16 if fmt.bits < 16 and q.dtype == torch.bfloat16 else q.dtype
    kbuf = torch.empty((starts[-1], fmt.num_kv_heads, fmt.head_dim), dtype=work, device=q.device)
    row_starts = torch.tensor(starts, dtype=torch.int32).to(q.device, non_blocking=True)
    max_q = max((b - a for a, b in zip(query_start_host, query_start_host[1:])), default=0)
    plan = SdpaPlan(starts, list(query_start_host), max(seq_lens_host, default=0), max_q,
                    row_starts, kbuf, torch.empty_like(kbuf))  # fmt: skip
    if fmt.had_block or work != q.dtype:
        plan.qbuf = torch.empty(q.shape, dtype=work, device=q.device)
    if num_sink:
        pairs = [(starts[s] + j, s * num_sink + j)
                 for s, n in enumerate(seq_lens_host) for j in range(min(n, num_sink))]  # fmt: skip
        idx = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2).T.contiguous()
        plan.sink_dst, plan.sink_src = idx.to(q.device, non_blocking=True)
    return plan


def extend_via_sdpa(
    q: torch.Tensor,
    pages: KVPages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    out: torch.Tensor,
    fmt: PageFormat,
    *,
    scale: float,
    plan: SdpaPlan,
    sinks: SinkKV | None = None,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Extend attention: dequantize each sequence's pages once, then FlashAttention (SDPA).

    Same contract as :func:`sawkv.kernels.paged_attention_extend`, plus the step's
    :class:`SdpaPlan` (host lengths, workspaces): one varlen FlashAttention call (or one SDPA
    call per sequence) with the bottom-right causal mask (query i sits at position
    ``seq_len - q_len + i``), and with ``sliding_window`` > 0 FlashAttention's left window of
    ``sliding_window - 1`` keys (an explicit mask per sequence where varlen is missing). Keys
    are stored rotated and centered, so the query is rotated once (softmax ignores the shared
    ``q.mu``); with rotated values the output is rotated back. ``sinks`` (planned with
    ``num_sink``): the exact K/V of each sequence's first positions replace their dequantized
    rows, centered and rotated as the pages store them.
    """
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    num_seqs = len(plan.starts) - 1
    starts, query_start_host = plan.starts, plan.query_start_host
    kbuf, vbuf, row_starts = plan.kbuf, plan.vbuf, plan.row_starts
    had_block = fmt.had_block
    k_cache, v_cache, k_meta, v_meta = pages
    common = dict(max_seq_len=plan.max_seq_len)
    dequant_pages(k_cache, k_meta, block_tables, seq_lens, row_starts, kbuf, fmt, is_key=True,
                  **common)  # fmt: skip
    dequant_pages(v_cache, v_meta, block_tables, seq_lens, row_starts, vbuf, fmt, is_key=False,
                  **common)  # fmt: skip
    if sinks is not None:
        if plan.sink_dst is None:
            raise ValueError("the SDPA plan was made without attention sinks (num_sink=0)")
        _overwrite_sinks(kbuf, vbuf, sinks, fmt, plan)
    if plan.qbuf is not None:  # rotated in fp32, rounded once to the working dtype
        if plan.qbuf.shape != q.shape:
            planned = tuple(plan.qbuf.shape)
            raise ValueError(f"the SDPA plan was made for q {planned}, not {tuple(q.shape)}")
        qr = rotate_cast(q, had_block, plan.qbuf)
    else:
        qr = q
    o = None
    if num_seqs > 1 and qr.is_cuda:
        # One varlen FlashAttention call for the whole batch: a host loop of per-sequence SDPA
        # calls costs ~10 launches per sequence and layer, which dominated steps that prefill
        # many short prompts (64 x 256 tokens: 23K launches per step on a 36-layer model).
        o = _flash_varlen(qr, kbuf, vbuf, query_start_loc, row_starts, plan.max_query_len,
                          plan.max_seq_len, scale, sliding_window)  # fmt: skip
    if o is None:
        o = torch.empty_like(qr)
        for s in range(num_seqs):
            q0, q1 = query_start_host[s], query_start_host[s + 1]
            if q1 == q0:
                continue
            k0, k1 = starts[s], starts[s + 1]
            qs = qr[q0:q1].transpose(0, 1)[None]  # [1, Hq, q_len, d]
            ks = kbuf[k0:k1].transpose(0, 1)[None]  # [1, H, seq_len, d]
            vs = vbuf[k0:k1].transpose(0, 1)[None]
            if sliding_window > 0:  # bottom-right causal, and only the last window positions
                qpos = torch.arange(k1 - k0 - (q1 - q0), k1 - k0, device=qr.device)[:, None]
                kpos = torch.arange(k1 - k0, device=qr.device)
                mask = (kpos <= qpos) & (kpos > qpos - sliding_window)
            else:
                mask = causal_lower_right(q1 - q0, k1 - k0)
            o_s = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True
            )
            o[q0:q1] = o_s[0].transpose(0, 1)  # [q_len, Hq, d]
    if fmt.rotate_v:
        rotate_cast(o, had_block, out)
    else:
        out.copy_(o)
    return out


def _overwrite_sinks(kbuf, vbuf, sinks: SinkKV, fmt: PageFormat, plan: SdpaPlan) -> None:
    """Write the exact sinks over their dequantized rows, as the pages would store them:
    ``R (k - mu)``, and ``R v`` with rotated values (fp16 rows clamped to its range)."""
    shape = (-1, fmt.num_kv_heads, fmt.head_dim)
    k = sinks.k.reshape(shape).index_select(0, plan.sink_src)
    if sinks.k_mean is not None:
        k = k.float() - sinks.k_mean.float()
    v = sinks.v.reshape(shape).index_select(0, plan.sink_src)
    v_had = fmt.had_block if fmt.rotate_v else 0
    for buf, x, had in ((kbuf, k, fmt.had_block), (vbuf, v, v_had)):
        if had or x.dtype != buf.dtype:
            x = rotate_cast(x, had, torch.empty(x.shape, dtype=buf.dtype, device=buf.device))
        buf.index_copy_(0, plan.sink_dst, x)


# None until the first call decides whether aten's varlen FlashAttention runs on this build.
_VARLEN_OK: dict[str, bool] = {}


def _flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor | None:
    """Causal varlen FlashAttention-2 (``aten._flash_attention_forward``), or None where this
    torch build or GPU has no such kernel (the caller then loops over sequences).

    Args:
        q: ``[T_q, Hq, d]`` fp16/bf16; k, v: ``[T_k, H, d]`` (GQA: ``Hq % H == 0``).
        cu_q, cu_k: ``[S + 1]`` int32 device cumulative lengths; max_q, max_k the longest
            query and key runs (host ints, from the step's plan).
        sliding_window: > 0 lets each query see only the last that many positions up to its
            own (FlashAttention's ``window_size_left = sliding_window - 1``).
    Returns:
        ``[T_q, Hq, d]``. FlashAttention-2 aligns the causal mask bottom-right, so query i of a
        sequence attends to keys ``0 .. k_len - q_len + i``, as in the per-sequence path.
    """
    key = f"{q.device}/{'window' if sliding_window > 0 else 'full'}"
    if _VARLEN_OK.get(key) is False:
        return None
    window = dict(window_size_left=sliding_window - 1, window_size_right=0)
    try:
        o = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale,
            **(window if sliding_window > 0 else {}),
        )[0]  # fmt: skip
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError):
        _VARLEN_OK[key] = False
        return None
    _VARLEN_OK[key] = True
    return o
