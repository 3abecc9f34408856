"""Torch reference of the paged-cache contracts: the oracle of the Triton kernels and the CPU path.

Same signatures and layout as :mod:`sawkv.kernels`: one layer's pages are a
:class:`~sawkv.kernels.page_format.KVPages` ``(k_cache, v_cache, k_meta, v_meta)`` read through
its :class:`~sawkv.kernels.page_format.PageFormat` (layout in ``page_format.py``); a slot is
``block_id * block_size + offset``.

Keys are stored as ``R (k - mu)``, values as ``R v`` (``fmt.rotate_v``) or ``v``;
``fmt.had_block=0`` means no rotation. Attention rotates the query once
(``q.k = (Rq).(R(k - mu)) + q.mu`` and softmax drops the shared ``q.mu``) and, with rotated
values, the output once (``sum p R v = R sum p v``).

Numerics come from :mod:`sawkv.quant` (``quantize_int``, ``pack_int4``, ``rotate``) so the stored
bytes are exactly what ``KVMethod.encode`` produces; attention runs in fp32.
"""

from __future__ import annotations

import math

import torch

from sawkv.kernels.checks import (
    check_attention_inputs,
    check_out,
    check_query_start_loc,
    check_write_inputs,
)
from sawkv.kernels.page_format import KVPages, PageFormat
from sawkv.kernels.page_layout import GROUP, from_pages, group_perm
from sawkv.kernels.sinks import SinkKV
from sawkv.quant.hadamard import rotate
from sawkv.quant.int4 import dequantize_int, pack_int4, quantize_int, unpack_int4

# Bound on the fp32 score matrix of one extend chunk (elements), to keep CPU memory in check.
_MAX_SCORE_ELEMS = 1 << 25


# ---- write ---------------------------------------------------------------------------------------
def _encode(x: torch.Tensor, bits: int, page_dtype: torch.dtype, halves: bool = False):
    """fp32 ``x [n, H, d]`` -> (page data ``[n, H, P]``, meta fp16 or None).

    meta is ``[n, H, 2]`` (scale, min), or with ``halves`` ``[n, H, 4]`` (scale_lo, min_lo,
    scale_hi, min_hi) of elements ``[0, d/2)`` and ``[d/2, d)`` quantized on their own."""
    if bits == 16:
        return x.to(page_dtype), None
    codes, meta = quantize_int(x, bits, x.shape[-1] // 2 if halves else None)
    return (pack_int4(codes) if bits == 4 else codes), meta.flatten(-2)


def cache_write_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    pages: KVPages,
    slot_mapping: torch.Tensor,
    fmt: PageFormat,
    k_mean: torch.Tensor | None = None,
) -> None:
    """Rotate, quantize and scatter new K/V tokens into the pages (in place).

    Args:
        k, v: ``[num_tokens, num_kv_heads, head_dim]`` float (post-RoPE).
        pages: one layer's pages in format ``fmt`` (module docstring).
        slot_mapping: ``[num_tokens]`` int32/int64 slot of each token; -1 skips the token.
        fmt: the pages' format (bits, had_block, rotate_v, k_half_meta, shapes).
        k_mean: ``[num_kv_heads, head_dim]`` key mean subtracted before rotating, or None.
    """
    check_write_inputs(k, v, pages, slot_mapping, fmt, k_mean)
    k_cache, v_cache, k_meta, v_meta = pages
    bits, had_block = fmt.bits, fmt.had_block
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if slots.numel() == 0:
        return
    block_size = k_cache.shape[2]
    block_ids, offsets = slots // block_size, slots % block_size
    kx = k[keep].float()
    if k_mean is not None:
        kx = kx - k_mean.float()
    vx = v[keep].float()
    if had_block:
        kx = rotate(kx, had_block)
        vx = rotate(vx, had_block) if fmt.rotate_v else vx
    for x, cache, meta, is_key in ((kx, k_cache, k_meta, True), (vx, v_cache, v_meta, False)):
        data, m = _encode(x, bits, cache.dtype, halves=is_key and fmt.k_half_meta)
        if bits == 16:
            # advanced indices around a slice: cache[b, :, o] is [n, H, P]
            cache[block_ids, :, offsets] = data
        else:
            # codes live in fragment order within each 16-token group (kernels/page_layout.py)
            num_blocks, num_heads, bs, p = cache.shape
            perm = group_perm(bits, x.shape[-1], is_key, cache.device).long()
            idx = (offsets // GROUP * GROUP * p)[:, None] + perm[offsets % GROUP]  # [n, P]
            flat = cache.view(num_blocks, num_heads, bs * p)
            flat[block_ids[:, None], :, idx] = data.transpose(1, 2)  # indexed as [n, P, H]
        if m is not None:
            meta[block_ids, :, offsets] = m


# ---- read ----------------------------------------------------------------------------------------
def _gather(cache, meta, block_ids: torch.Tensor, bits: int, is_key: bool) -> torch.Tensor:
    """Dequantized fp32 K or V of the pages ``block_ids [..., nb]`` -> ``[..., H, nb*bs, d]``.

    ``meta [..., 2 * G]`` holds G (scale, min) pairs per row, each for d / G consecutive
    elements (G = 2: a key of a ``k_half_meta`` format)."""
    pages = cache[block_ids]  # [..., nb, H, bs, P]
    if bits == 16:
        x = pages.float()
    else:
        pages = from_pages(pages, bits, is_key)
        codes = unpack_int4(pages) if bits == 4 else pages
        x = dequantize_int(codes, meta[block_ids].unflatten(-1, (-1, 2)))
    x = x.movedim(-4, -3)  # [..., H, nb, bs, d]
    return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])


def _safe_blocks(block_tables: torch.Tensor, num_blocks_cache: int, num_blocks: int):
    """The first ``num_blocks`` columns with out-of-range ids (unused entries) mapped to page 0;
    the positions they hold are masked out of attention."""
    bt = block_tables[:, :num_blocks].long()
    return torch.where((bt >= 0) & (bt < num_blocks_cache), bt, 0)


def _rotate_q(q: torch.Tensor, had_block: int) -> torch.Tensor:
    q = q.float()
    return rotate(q, had_block) if had_block else q


def _with_sinks(k, v, sinks: SinkKV | None, fmt: PageFormat, seqs: slice | None = None):
    """Dequantized ``k, v [S, H, L, d]`` (stored space) with the rows of positions below
    ``sinks.num_sink`` replaced by the exact sinks, centered and rotated as the pages store
    them. ``seqs`` picks the sequences of ``sinks`` that ``k, v`` hold."""
    if sinks is None:
        return k, v
    sk, sv = sinks.k.float(), sinks.v.float()
    if seqs is not None:
        sk, sv = sk[seqs], sv[seqs]
    if sinks.k_mean is not None:
        sk = sk - sinks.k_mean.float()
    if fmt.had_block:
        sk = rotate(sk, fmt.had_block)
        sv = rotate(sv, fmt.had_block) if fmt.rotate_v else sv
    n = min(sinks.num_sink, k.shape[2])
    k, v = k.clone(), v.clone()
    k[:, :, :n] = sk[:, :n].transpose(1, 2)  # [S, n, H, d] -> [S, H, n, d]
    v[:, :, :n] = sv[:, :n].transpose(1, 2)
    return k, v


def _attend(q, k, v, mask, scale: float) -> torch.Tensor:
    """``q [..., H, G, M, d]``, ``k, v [..., H, L, d]``, ``mask [..., 1|H, 1|G, M, L]`` -> out.

    Masked positions get zero weight; their K/V may hold garbage (NaN included), so V is zeroed
    where no query of the row attends. A row with nothing to attend to returns 0.
    """
    s = torch.einsum("...hgmd,...hld->...hgml", q, k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)
    used = mask.any(-2).any(-2).unsqueeze(-1)  # [..., 1|H, L, 1]
    v = torch.where(used, v, 0.0)
    return torch.einsum("...hgml,...hld->...hgmd", p, v)


def _finish(out: torch.Tensor, fmt: PageFormat, dest, dtype) -> torch.Tensor:
    if fmt.rotate_v:
        out = rotate(out, fmt.had_block)
    if dest is None:
        return out.to(dtype)
    dest.copy_(out)
    return dest


def paged_attention_decode_ref(
    q: torch.Tensor,
    pages: KVPages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    fmt: PageFormat,
    *,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
    sinks: SinkKV | None = None,
) -> torch.Tensor:
    """One query token per sequence over its paged context.

    Args:
        q: ``[num_seqs, num_q_heads, head_dim]`` in model space (un-rotated).
        pages: one layer's pages in format ``fmt`` (module docstring).
        block_tables: ``[num_seqs, max_blocks]`` int32 page ids. seq_lens: ``[num_seqs]`` int32
            context length including the current token (already written).
        scale: softmax scale. sliding_window: > 0 attends only to the last that many positions.
        sinks: exact K/V of each sequence's first positions (:class:`SinkKV`), read instead
            of the pages' quantized ones; None reads every position from the pages.
    Returns:
        ``[num_seqs, num_q_heads, head_dim]`` in ``q.dtype`` (written into ``out`` if given).
    """
    num_seqs = check_attention_inputs(q, pages, fmt, block_tables, seq_lens, sliding_window)
    k_cache, v_cache, k_meta, v_meta = pages
    num_q_heads, num_kv_heads = q.shape[1], fmt.num_kv_heads
    block_size, head_dim, bits, had_block = fmt.block_size, fmt.head_dim, fmt.bits, fmt.had_block
    if q.shape[0] != num_seqs:
        raise ValueError(f"q has {q.shape[0]} tokens but there are {num_seqs} sequences (decode)")
    check_out(out, q.shape, q.dtype, q.device)
    if sinks is not None:
        sinks.check(num_seqs, fmt)
    if num_seqs == 0:
        return q.new_empty(q.shape) if out is None else out
    max_len = int(seq_lens.max())
    nb = min(max(1, math.ceil(max_len / block_size)), block_tables.shape[1])
    blocks = _safe_blocks(block_tables, k_cache.shape[0], nb)
    k = _gather(k_cache, k_meta, blocks, bits, True)  # [S, H, L, d]
    v = _gather(v_cache, v_meta, blocks, bits, False)
    k, v = _with_sinks(k, v, sinks, fmt)
    pos = torch.arange(k.shape[2], device=q.device)
    lens = seq_lens.long()[:, None]
    mask = pos < lens
    if sliding_window > 0:
        mask &= pos >= lens - sliding_window
    g = num_q_heads // num_kv_heads
    qr = _rotate_q(q, had_block).reshape(num_seqs, num_kv_heads, g, 1, head_dim)
    o = _attend(qr, k, v, mask[:, None, None, None, :], scale)
    return _finish(o.reshape(q.shape), fmt, out, q.dtype)


def paged_attention_extend_ref(
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
    sinks: SinkKV | None = None,
) -> torch.Tensor:
    """Several new query tokens per sequence, causal over the cached context plus themselves.

    ::

        positions  0 ................ seq_len-q_len ........ seq_len-1
                   |<-- cached context -->|<-- new tokens q_len -->|
        query i of sequence s sits at seq_len_s - q_len_s + i and sees positions <= its own
        (and > its own - sliding_window when sliding_window > 0).

    Args:
        q: ``[num_tokens, num_q_heads, head_dim]``, the new tokens of all sequences concatenated.
        seq_lens: ``[num_seqs]`` int32 including the new tokens (already in the pages).
        query_start_loc: ``[num_seqs + 1]`` int32 cumulative query lengths.
        Other arguments as in :func:`paged_attention_decode_ref`.
    Returns:
        ``[num_tokens, num_q_heads, head_dim]`` in ``q.dtype``.
    """
    num_seqs = check_attention_inputs(q, pages, fmt, block_tables, seq_lens, sliding_window)
    check_query_start_loc(query_start_loc, num_seqs, q.device)
    if sinks is not None:
        sinks.check(num_seqs, fmt)
    k_cache, v_cache, k_meta, v_meta = pages
    num_q_heads, num_kv_heads = q.shape[1], fmt.num_kv_heads
    block_size, head_dim, bits, had_block = fmt.block_size, fmt.head_dim, fmt.bits, fmt.had_block
    check_out(out, q.shape, q.dtype, q.device)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    if qsl[-1] != q.shape[0]:
        raise ValueError(f"query_start_loc[-1]={qsl[-1]} must equal q's {q.shape[0]} tokens")
    g = num_q_heads // num_kv_heads
    qr = _rotate_q(q, had_block)
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for s in range(num_seqs):
        q_len, seq_len = qsl[s + 1] - qsl[s], lens[s]
        if q_len == 0:
            continue
        if q_len > seq_len:
            raise ValueError(f"sequence {s}: {q_len} new tokens but seq_len is only {seq_len}")
        nb = min(math.ceil(seq_len / block_size), block_tables.shape[1])
        blocks = _safe_blocks(block_tables[s : s + 1], k_cache.shape[0], nb)[0]
        k = _gather(k_cache, k_meta, blocks, bits, True)  # [H, L, d]
        v = _gather(v_cache, v_meta, blocks, bits, False)
        if sinks is not None:
            k, v = (x[0] for x in _with_sinks(k[None], v[None], sinks, fmt, slice(s, s + 1)))
        pos = torch.arange(k.shape[1], device=q.device)
        chunk = max(1, _MAX_SCORE_ELEMS // (num_q_heads * k.shape[1]))
        for c0 in range(0, q_len, chunk):
            c1 = min(q_len, c0 + chunk)
            qpos = seq_len - q_len + torch.arange(c0, c1, device=q.device)[:, None]
            mask = (pos <= qpos) & (pos < seq_len)
            if sliding_window > 0:
                mask &= pos > qpos - sliding_window
            qc = qr[qsl[s] + c0 : qsl[s] + c1].reshape(c1 - c0, num_kv_heads, g, head_dim)
            oc = _attend(qc.permute(1, 2, 0, 3), k, v, mask[None, None], scale)  # [H, G, M, d]
            o[qsl[s] + c0 : qsl[s] + c1] = oc.permute(2, 0, 1, 3).reshape(c1 - c0, -1, head_dim)
    return _finish(o, fmt, out, q.dtype)
