"""Cache write, group path: whole 16-token groups stored as one contiguous run of bytes.

Prefill writes runs of consecutive positions, so most of its tokens fill whole 16-token groups
of a page. The per-token path (``cache_write._quantize_store``) scatters each token's bytes one
by one through the group's byte table (the fragment order of ``page_layout.py`` interleaves the
16 tokens of a group at byte granularity), which makes the write instruction-bound. Here a
program that holds all 16 rows of a group reorders the codes in registers (the fragment order
is a permutation of the axes of ``[token, byte]`` digits, see :func:`_store_group`) and stores
the group's ``16 * P`` bytes with contiguous, vectorizable stores.

One program owns the 16-token tile ``[16 i, 16 i + 16)`` of the batch and one KV head. A
*group start* is a token whose slot is the first of a 16-token group and whose next 15 tokens
have the next 15 slots (checked one by one, so any slot mapping is safe). Within a tile there
is at most one start; the program writes the group that starts in its tile (which may reach
into the next tile), and the per-token path writes the tile's tokens that no group covers
(decode tokens, the ragged ends of prefill chunks, groups split across pages of another
sequence). The previous tile's group is recomputed exactly as that tile computes it, so every
token is written once. Numerics are those of the per-token path (same helpers).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sawkv.kernels.cache_write import _dest_offsets, _quantize, _quantize_store, _store_meta
from sawkv.kernels.rotation import load_rotated_rows
from sawkv.kernels.tiles import _k_meta_rows

_NONE = 1 << 30  # "no group" token index (beyond any batch)


@triton.jit
def _store_group(c_lo, c_hi, dest_ptr, BITS: tl.constexpr, DH: tl.constexpr, IS_KEY: tl.constexpr):
    """Store codes ``[16, DH]`` (c_lo: elements 0..DH-1, c_hi: DH..2DH-1) of one group's 16
    tokens as the group's run of bytes in fragment order, at ``dest_ptr``.

    Digits of a canonical byte index ``token * P + j`` (``page_layout.py``, lane ``4 g + t``,
    word ``2 w + s``, byte ``b``):
    INT4 keys ``[hi, g | w, s, t, e]`` -> physical ``[g, t, w, s, e, hi]``;
    INT4 values ``[s, t, e | w, h8, g]`` -> ``[g, t, w, s, e, h8]``;
    INT8 keys -> ``[g, t, w, s, hi, e]``; INT8 values -> ``[g, t, w, s, h8, e]``
    (token digits before ``|``, byte-in-row digits after)."""
    if BITS == 4:
        W: tl.constexpr = DH // 16
        x = c_lo | (c_hi << 4)  # [16, DH]: byte j = code j | code j + d/2 << 4
        if IS_KEY:
            x = tl.permute(tl.reshape(x, (2, 8, W, 2, 4, 2)), (1, 4, 2, 3, 5, 0))
        else:
            x = tl.permute(tl.reshape(x, (2, 4, 2, W, 2, 8)), (5, 1, 3, 0, 2, 4))
        tl.store(dest_ptr + tl.arange(0, 16 * DH), tl.reshape(x, (16 * DH,)))
    else:
        W8: tl.constexpr = DH // 8
        x = tl.reshape(tl.permute(tl.join(c_lo, c_hi), (0, 2, 1)), (16, 2 * DH))  # [16, D]
        if IS_KEY:
            x = tl.permute(tl.reshape(x, (2, 8, W8, 2, 4, 2)), (1, 4, 2, 3, 0, 5))
        else:
            x = tl.permute(tl.reshape(x, (2, 4, 2, W8, 2, 8)), (5, 1, 3, 0, 4, 2))
        tl.store(dest_ptr + tl.arange(0, 32 * DH), tl.reshape(x, (32 * DH,)))


@triton.jit
def _group_start(slot_ptr, first, num_tokens, NONE: tl.constexpr):
    """The group start among tokens ``[first, first + 16)`` (its token index), or NONE: the
    first token there whose slot is 0 mod 16 and whose next 15 tokens hold the next 15 slots."""
    t = first + tl.arange(0, 16)
    s0 = tl.load(slot_ptr + t, mask=(t >= 0) & (t < num_tokens), other=-1).to(tl.int64)
    s15 = tl.load(slot_ptr + t + 15, mask=(t >= 0) & (t + 15 < num_tokens), other=-2).to(tl.int64)
    cand = tl.min(tl.where((s0 >= 0) & (s0 % 16 == 0) & (s15 == s0 + 15), t, NONE), axis=0)
    r = tl.arange(0, 16)
    ok = (cand + r) < num_tokens
    run = tl.load(slot_ptr + cand + r, mask=ok, other=-1).to(tl.int64)
    head = tl.load(slot_ptr + cand, mask=cand < num_tokens, other=-1).to(tl.int64)
    bad = tl.sum(((run != head + r) | ~ok).to(tl.int32), axis=0)
    return tl.where(bad == 0, cand, NONE)


@triton.jit
def _cache_write_groups_kernel(
    k_ptr, v_ptr, k_page_ptr, v_page_ptr, k_meta_ptr, v_meta_ptr, k_perm_ptr, v_perm_ptr,
    slot_ptr, mean_ptr, num_tokens, norm,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_mean_h,
    stride_page_b, stride_page_h, stride_page_t, stride_meta_b, stride_meta_h, stride_meta_t,
    BLOCK_SIZE: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, HAD: tl.constexpr,
    ROT_V: tl.constexpr, HAS_MEAN: tl.constexpr, PREC: tl.constexpr, K_HALF: tl.constexpr,
    NONE: tl.constexpr,
):  # fmt: skip
    DH: tl.constexpr = D // 2
    base = tl.program_id(0) * 16
    h = tl.program_id(1)
    r = tl.arange(0, 16)
    own = _group_start(slot_ptr, base, num_tokens, NONE)
    prev = _group_start(slot_ptr, base - 16, num_tokens, NONE)

    if own < NONE:  # the group starting in this tile: one contiguous run per head, K and V
        s = tl.load(slot_ptr + own).to(tl.int64)
        blk = s // BLOCK_SIZE
        off = s % BLOCK_SIZE
        rows = own + r
        full = r < 16
        meta_row = blk * stride_meta_b + h * stride_meta_h + (off + r) * stride_meta_t
        run = blk * stride_page_b + h * stride_page_h + off * stride_page_t
        # both heads' rows are loaded before the first store (stores serialize later loads)
        k_lo, k_hi = load_rotated_rows(k_ptr, rows, stride_kt, h, stride_kh, full, mean_ptr,
                                       stride_mean_h, norm, 16, HAS_MEAN, HAD > 0, HAD, DH,
                                       PREC)  # fmt: skip
        v_lo, v_hi = load_rotated_rows(v_ptr, rows, stride_vt, h, stride_vh, full, mean_ptr,
                                       stride_mean_h, norm, 16, False, ROT_V, HAD, DH,
                                       PREC)  # fmt: skip
        c_lo, c_hi, s_lo, m_lo, s_hi, m_hi = _quantize(k_lo, k_hi, BITS, K_HALF)
        _store_group(c_lo, c_hi, k_page_ptr + run, BITS, DH, True)
        _store_meta(k_meta_ptr, _k_meta_rows(meta_row, K_HALF), s_lo, m_lo, s_hi, m_hi, None,
                    K_HALF)  # fmt: skip
        c_lo, c_hi, s_lo, m_lo, s_hi, m_hi = _quantize(v_lo, v_hi, BITS, False)
        _store_group(c_lo, c_hi, v_page_ptr + run, BITS, DH, False)
        _store_meta(v_meta_ptr, meta_row, s_lo, m_lo, s_hi, m_hi, None, False)

    # the tile's tokens that neither group covers go through the per-token path
    tok = base + r
    slot = tl.load(slot_ptr + tok, mask=tok < num_tokens, other=-1).to(tl.int64)
    covered = (tok >= own) | ((prev < NONE) & (tok < prev + 16))
    row_mask = (slot >= 0) & ~covered
    if tl.sum(row_mask.to(tl.int32), axis=0) > 0:
        blk = tl.where(row_mask, slot // BLOCK_SIZE, 0)
        off = tl.where(row_mask, slot % BLOCK_SIZE, 0)
        in_group = off % 16
        page_row = blk * stride_page_b + h * stride_page_h + (off - in_group) * stride_page_t
        meta_row = blk * stride_meta_b + h * stride_meta_h + off * stride_meta_t
        k_lo, k_hi = load_rotated_rows(k_ptr, tok, stride_kt, h, stride_kh, row_mask, mean_ptr,
                                       stride_mean_h, norm, 16, HAS_MEAN, HAD > 0, HAD, DH,
                                       PREC)  # fmt: skip
        v_lo, v_hi = load_rotated_rows(v_ptr, tok, stride_vt, h, stride_vh, row_mask, mean_ptr,
                                       stride_mean_h, norm, 16, False, ROT_V, HAD, DH,
                                       PREC)  # fmt: skip
        kd_lo, kd_hi = _dest_offsets(k_perm_ptr, in_group, row_mask, BITS, DH)
        vd_lo, vd_hi = _dest_offsets(v_perm_ptr, in_group, row_mask, BITS, DH)
        _quantize_store(k_lo, k_hi, k_page_ptr, k_meta_ptr, kd_lo, kd_hi, page_row,
                        _k_meta_rows(meta_row, K_HALF), row_mask, BITS, DH, K_HALF)  # fmt: skip
        _quantize_store(v_lo, v_hi, v_page_ptr, v_meta_ptr, vd_lo, vd_hi, page_row, meta_row,
                        row_mask, BITS, DH, False)  # fmt: skip
