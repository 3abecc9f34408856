"""Byte order of INT4 / INT8 pages: each 16-token group is stored in tensor-core fragment order.

A page of one KV head holds ``block_size`` tokens as ``block_size // 16`` groups. Logically a
token's row is its *canonical* packed bytes (``sawkv.quant.pack_int4``: byte i = code i |
code i + d/2 << 4 for INT4; byte i = code i for INT8). Physically each group of 16 rows is one
run of ``16 * P`` bytes (P = d/2 INT4, d INT8) whose bytes are a permutation of the 16 canonical
rows, chosen so that the decode kernel's warp reads the run with one coalesced 16-byte load per
lane and every 32-bit word a lane holds unpacks, with shifts and one ``lop3`` (INT4) or ``prmt``
(INT8) per half2, straight into the operand registers of ``mma.m16n8k16``:

* keys are the A operand of ``S^T = K q^T`` (rows = tokens, k = head dim);
* values are the A operand of ``O^T = V^T P^T`` (rows = head dim, k = tokens).

Lane ``L`` (``g = L // 4``, ``t = L % 4``) owns bytes ``[L * P/2, (L + 1) * P/2)`` of the run,
as 32-bit words. The fragment registers of ``m16n8k16`` are ``a0 = (row g, cols 2t, 2t+1)``,
``a1 = (row g+8, ...)``, ``a2 = (row g, cols 2t+8, 2t+9)``, ``a3 = (row g+8, cols 2t+8, 2t+9)``.

INT4: word ``u = 2w + s`` of a lane joins k-steps (keys) or m-tiles (values) ``w`` and
``w + d/32``, whose elements differ by d/2 and so share canonical bytes; its bytes are
``(r0.lo|r1.lo<<4, r2.lo|r3.lo<<4, r0.hi|r1.hi<<4, r2.hi|r3.hi<<4)`` with
``(r0, r1, r2, r3) = (a0[w], a0[w'], a1[w], a1[w'])`` for s = 0 and ``(a2.., a3..)`` for s = 1, so
``(x >> 4j) & 0x000F000F`` is register j for j = 0..3. INT8: word ``u = 2w + s`` of a lane holds
``(a0[w], a1[w])`` (s = 0) or ``(a2[w], a3[w])`` (s = 1), two codes each.

Every byte belongs to one token (no read-modify-write when a single token is written) and the
metadata ``[num_blocks, H, block_size, 2]`` (keys of a ``k_half_meta`` format: ``[..., 4]``)
keeps one row per token. Torch only (a leaf).
"""

from __future__ import annotations

from functools import cache

import torch

GROUP = 16  # tokens per fragment-ordered group; block_size must be a multiple of it


def _fragments(rows_are_tokens: bool, w: int, s: int, g: int, t: int, d_half: int):
    """(token, canonical element) of registers (r0, r1, r2, r3), each (lo, hi)."""
    if s == 0:
        regs = ((g, 2 * t), (g + 8, 2 * t))  # (row, col) of a0 and a1
    else:
        regs = ((g, 2 * t + 8), (g + 8, 2 * t + 8))  # a2, a3
    out = []
    for row, col in regs:
        for step in (w, w + d_half // 16):  # the element and its partner + d/2 (INT4)
            pair = []
            for e in (0, 1):
                if rows_are_tokens:  # keys: row = token, col = head dim within the k-step
                    pair.append((row, 16 * step + col + e))
                else:  # values: row = head dim within the m-tile, col = token
                    pair.append((col + e, 16 * step + row))
            out.append(pair)
    # out = [a_first[w], a_first[w'], a_second[w], a_second[w']]
    return out


@cache
def _perm(bits: int, head_dim: int, is_key: bool) -> tuple[tuple[int, ...], ...]:
    if bits not in (4, 8) or head_dim % 32:
        raise ValueError(
            f"fragment layout needs bits 4/8 and head_dim % 32 == 0, got {bits}, {head_dim}"
        )
    p = head_dim // 2 if bits == 4 else head_dim
    pos = [[-1] * p for _ in range(GROUP)]
    lane_bytes = GROUP * p // 32
    for lane in range(32):
        g, t = lane // 4, lane % 4
        base = lane * lane_bytes
        if bits == 4:
            for w in range(head_dim // 32):
                for s in (0, 1):
                    r0, r1, r2, r3 = _fragments(is_key, w, s, g, t, head_dim // 2)
                    word = base + 4 * (2 * w + s)
                    # byte (r_lo-reg.e | r_hi-reg.e << 4): canonical byte of the low element
                    for b, (ra, e) in enumerate(((r0, 0), (r2, 0), (r0, 1), (r2, 1))):
                        tok, elem = ra[e]
                        pos[tok][elem] = word + b
            # r1/r3 hold elem + d/2 of the same token: the high nibble of the same byte
        else:
            for w in range(head_dim // 16):
                for s in (0, 1):
                    regs = _fragments(is_key, w, s, g, t, 0)  # w' == w: use r0 and r2
                    word = base + 4 * (2 * w + s)
                    for b, (tok, elem) in enumerate((*regs[0], *regs[2])):
                        pos[tok][elem] = word + b
    flat = [x for row in pos for x in row]
    if sorted(flat) != list(range(GROUP * p)):
        raise AssertionError("fragment layout is not a permutation")  # a bug, not bad input
    return tuple(tuple(row) for row in pos)


def group_perm(bits: int, head_dim: int, is_key: bool, device=None) -> torch.Tensor:
    """Where each canonical byte lives in its 16-token group.

    Returns ``[16, P]`` int32: entry ``[o, j]`` is the byte offset, within the group's run of
    ``16 * P`` bytes, of byte j of the canonical row of token ``o`` (token offset mod 16).
    """
    return torch.tensor(_perm(bits, head_dim, is_key), dtype=torch.int32, device=device)


def to_pages(rows: torch.Tensor, bits: int, is_key: bool) -> torch.Tensor:
    """Canonical rows ``[..., block_size, P]`` uint8 -> the same shape in fragment order."""
    *lead, bs, p = rows.shape
    head_dim = 2 * p if bits == 4 else p
    perm = group_perm(bits, head_dim, is_key, rows.device).long().reshape(-1)
    grouped = rows.reshape(*lead, bs // GROUP, GROUP * p)
    out = torch.empty_like(grouped)
    out[..., perm] = grouped
    return out.reshape(rows.shape)


def from_pages(pages: torch.Tensor, bits: int, is_key: bool) -> torch.Tensor:
    """Inverse of :func:`to_pages`: fragment-ordered ``[..., block_size, P]`` -> canonical rows."""
    *lead, bs, p = pages.shape
    head_dim = 2 * p if bits == 4 else p
    perm = group_perm(bits, head_dim, is_key, pages.device).long().reshape(-1)
    grouped = pages.reshape(*lead, bs // GROUP, GROUP * p)
    return grouped[..., perm].reshape(pages.shape)
