"""Fused cache write: center, rotate, quantize, pack and scatter new K/V tokens into the pages.

One program takes ``BLOCK_T`` tokens of one KV head, K and V both, in one pass: load, subtract
the key mean, rotate in registers (:mod:`sawkv.kernels.rotation`), per-row min/max (per half-row
for keys of a ``k_half_meta`` format: the halves the kernels already hold apart), quantize,
pack two codes per byte and store at ``slot_mapping`` (INT4/INT8 bytes in the fragment order of
``page_layout.py``). Nothing but the pages is written.

Numerics follow ``sawkv.quant.int4.quantize_int`` step for step (fp32; NaN -> 0 and clamp to
±65504 after the transform; scale = fp16((max - min) / qmax), min = fp16(min); codes
``floor((x - min16) * (1 / scale16) + 0.5)`` with an IEEE ``div_rn`` reciprocal). The bytes match
the oracle exactly without rotation; with rotation the fp32 sums run in another order than the
oracle's butterflies (and the GPU may fuse the multiply-add), so a value sitting within an ulp
of a rounding boundary can land one code apart, and a min/max within an ulp of an fp16 rounding
tie can move the stored fp16 by one ulp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sawkv.kernels.checks import check_write_inputs
from sawkv.kernels.launch import _perm_args
from sawkv.kernels.page_format import KVPages, PageFormat
from sawkv.kernels.rotation import load_rotated_rows, rotate_cast
from sawkv.kernels.tiles import _k_meta_rows

FP16_MAX = 65504.0
# Rotation of bf16/fp16 rows by default: "exact16" (16-bit tensor cores, rotation.py). The GPU
# check pass of benchmarks/bench_kernels.py compared it with the reference on an H100
# (kernels_write_h100.json: at most one code step on <1e-5 of the codes, as tf32x3) and it
# writes K+V-rotated, centered pages 2.7x faster than tf32x3 at 65,536 tokens.
DEFAULT_ROTATION_16 = "exact16"


@triton.jit
def _scale_min(mn, mx, BITS: tl.constexpr):
    """Range ``[mn, mx]`` ``[R]`` fp32 -> fp16 ``(scale, min)`` and the fp32 min and reciprocal
    step the codes are computed against (the fp16-rounded ones, so both directions agree)."""
    qmax = 2.0**BITS - 1.0
    scale16 = ((mx - mn) / qmax).to(tl.float16)
    mn16 = mn.to(tl.float16)
    scale = scale16.to(tl.float32)
    inv = tl.where(scale > 0, tl.math.div_rn(1.0, tl.where(scale > 0, scale, 1.0)), 0.0)
    return scale16, mn16, mn16.to(tl.float32), inv


@triton.jit
def _codes(x, mnf, inv, BITS: tl.constexpr):
    """``[R, DH]`` fp32 -> uint8 codes ``floor((x - min) / scale + 0.5)`` clamped to the range."""
    qmax = 2.0**BITS - 1.0
    c = tl.floor((x - mnf[:, None]) * inv[:, None] + 0.5)
    return tl.minimum(tl.maximum(c, 0.0), qmax).to(tl.uint8)


@triton.jit
def _quantize(lo, hi, BITS: tl.constexpr, HALF: tl.constexpr):
    """Rows ``[lo | hi]`` (each ``[R, DH]`` fp32) -> codes ``(c_lo, c_hi)`` uint8 ``[R, DH]``
    and fp16 ``(scale_lo, min_lo, scale_hi, min_hi)`` ``[R]``, as
    ``sawkv.quant.int4.quantize_int``: one range per row (both pairs the same), or with HALF
    one per half (``quantize_int`` with groups of d/2)."""
    lo = tl.minimum(tl.maximum(tl.where(lo != lo, 0.0, lo), -65504.0), 65504.0)
    hi = tl.minimum(tl.maximum(tl.where(hi != hi, 0.0, hi), -65504.0), 65504.0)
    if HALF:
        s_lo, m_lo, mnf_lo, inv_lo = _scale_min(tl.min(lo, axis=1), tl.max(lo, axis=1), BITS)
        s_hi, m_hi, mnf_hi, inv_hi = _scale_min(tl.min(hi, axis=1), tl.max(hi, axis=1), BITS)
        c_lo = _codes(lo, mnf_lo, inv_lo, BITS)
        return c_lo, _codes(hi, mnf_hi, inv_hi, BITS), s_lo, m_lo, s_hi, m_hi
    mn = tl.minimum(tl.min(lo, axis=1), tl.min(hi, axis=1))
    mx = tl.maximum(tl.max(lo, axis=1), tl.max(hi, axis=1))
    scale16, mn16, mnf, inv = _scale_min(mn, mx, BITS)
    c_lo = _codes(lo, mnf, inv, BITS)
    return c_lo, _codes(hi, mnf, inv, BITS), scale16, mn16, scale16, mn16


@triton.jit
def _store_meta(meta_ptr, meta_row, s_lo, m_lo, s_hi, m_hi, mask, HALF: tl.constexpr):
    """Store ``(scale, min)`` at ``meta_row`` (offsets into this tensor), or with HALF
    ``(scale_lo, min_lo, scale_hi, min_hi)``; ``mask`` None stores every row."""
    tl.store(meta_ptr + meta_row, s_lo, mask=mask)
    tl.store(meta_ptr + meta_row + 1, m_lo, mask=mask)
    if HALF:
        tl.store(meta_ptr + meta_row + 2, s_hi, mask=mask)
        tl.store(meta_ptr + meta_row + 3, m_hi, mask=mask)


@triton.jit
def _dest_offsets(perm_ptr, in_group, row_mask, BITS: tl.constexpr, DH: tl.constexpr):
    """Byte (element, for BITS=16) offsets ``(lo, hi)`` ``[R, DH]`` int32 of each row's two
    halves from the start of its page row (BITS=16) or 16-token group (INT4/INT8: the group's
    byte table ``perm_ptr [16, P]``, ``page_layout.py``; INT4 stores one byte per pair, so
    ``hi`` is ``lo``). Loaded before any store of the program: loads issued after a store
    cannot be hoisted above it (the pointers may alias), so they would wait for it."""
    cols = tl.arange(0, DH)[None, :]
    if BITS == 16:
        zero = tl.zeros_like(in_group)[:, None].to(tl.int32)
        return zero + cols, zero + cols + DH
    m2 = row_mask[:, None]
    perm_row = perm_ptr + in_group[:, None] * (DH if BITS == 4 else 2 * DH) + cols
    lo = tl.load(perm_row, mask=m2, other=0)
    if BITS == 4:
        return lo, lo
    return lo, tl.load(perm_row + DH, mask=m2, other=0)


@triton.jit
def _quantize_store(
    lo,  # [BLOCK_T, DH] fp32, first half of each row
    hi,  # [BLOCK_T, DH] fp32, second half
    page_ptr,  # [num_blocks, H, block_size, P] uint8 or float
    meta_ptr,  # [num_blocks, H, block_size, 2 | 4] fp16
    d_lo,  # [BLOCK_T, DH] int32 offsets of the halves from page_row (_dest_offsets)
    d_hi,
    page_row,  # [BLOCK_T] int64 element offset of each token's row (float) or group (INT)
    meta_row,  # [BLOCK_T] int64 element offset of each token's metadata in meta_ptr
    row_mask,  # [BLOCK_T] bool
    BITS: tl.constexpr,
    DH: tl.constexpr,
    HALF: tl.constexpr,  # one (scale, min) per half-row (k_half_meta keys)
):
    m2 = row_mask[:, None]
    base = page_ptr + page_row[:, None]
    if BITS == 16:
        ty = page_ptr.dtype.element_ty
        tl.store(base + d_lo, lo.to(ty), mask=m2)
        tl.store(base + d_hi, hi.to(ty), mask=m2)
    else:
        c_lo, c_hi, s_lo, m_lo, s_hi, m_hi = _quantize(lo, hi, BITS, HALF)
        # canonical byte j of the row goes where the group's byte table puts it
        if BITS == 4:
            tl.store(base + d_lo, c_lo | (c_hi << 4), mask=m2)
        else:
            tl.store(base + d_lo, c_lo, mask=m2)
            tl.store(base + d_hi, c_hi, mask=m2)
        _store_meta(meta_ptr, meta_row, s_lo, m_lo, s_hi, m_hi, row_mask, HALF)


@triton.jit
def _cache_write_kernel(
    k_ptr,  # [T, H, D] float
    v_ptr,  # [T, H, D] float
    k_page_ptr,  # [num_blocks, H, block_size, P]
    v_page_ptr,  # same
    k_meta_ptr,  # [num_blocks, H, block_size, 2 | 4 (K_HALF)] fp16 (dummy for BITS=16)
    v_meta_ptr,  # [num_blocks, H, block_size, 2] fp16 (dummy for BITS=16)
    k_perm_ptr,  # [16, P] int32 (INT4/INT8; dummy for BITS=16)
    v_perm_ptr,
    slot_ptr,  # [T] int32/int64, -1 = skip
    mean_ptr,  # [H, D] float (dummy without HAS_MEAN)
    num_tokens,
    norm,  # fp32 1/sqrt(HAD)
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_mean_h,
    stride_page_b,
    stride_page_h,
    stride_page_t,
    stride_meta_b,  # v_meta's strides (k_meta's offsets follow: _k_meta_rows)
    stride_meta_h,
    stride_meta_t,
    BLOCK_SIZE: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    HAD: tl.constexpr,
    ROT_V: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    PREC: tl.constexpr,
    K_HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    DH: tl.constexpr = D // 2
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + tok, mask=tok < num_tokens, other=-1).to(tl.int64)
    row_mask = slot >= 0
    blk = tl.where(row_mask, slot // BLOCK_SIZE, 0)
    off = tl.where(row_mask, slot % BLOCK_SIZE, 0)
    in_group = off % 16
    if BITS == 16:
        page_row = blk * stride_page_b + h * stride_page_h + off * stride_page_t
    else:
        page_row = blk * stride_page_b + h * stride_page_h + (off - in_group) * stride_page_t
    meta_row = blk * stride_meta_b + h * stride_meta_h + off * stride_meta_t

    # every load before the first store (stores would serialize the loads behind them)
    k_lo, k_hi = load_rotated_rows(k_ptr, tok, stride_kt, h, stride_kh, row_mask, mean_ptr,
                                   stride_mean_h, norm, BLOCK_T, HAS_MEAN, HAD > 0, HAD, DH,
                                   PREC)  # fmt: skip
    v_lo, v_hi = load_rotated_rows(v_ptr, tok, stride_vt, h, stride_vh, row_mask, mean_ptr,
                                   stride_mean_h, norm, BLOCK_T, False, ROT_V, HAD, DH,
                                   PREC)  # fmt: skip
    kd_lo, kd_hi = _dest_offsets(k_perm_ptr, in_group, row_mask, BITS, DH)
    vd_lo, vd_hi = _dest_offsets(v_perm_ptr, in_group, row_mask, BITS, DH)
    _quantize_store(
        k_lo, k_hi, k_page_ptr, k_meta_ptr, kd_lo, kd_hi, page_row, _k_meta_rows(meta_row, K_HALF),
        row_mask, BITS, DH, K_HALF,
    )  # fmt: skip
    _quantize_store(
        v_lo, v_hi, v_page_ptr, v_meta_ptr, vd_lo, vd_hi, page_row, meta_row, row_mask, BITS, DH,
        False,
    )  # fmt: skip


def _pick_launch(num_tokens: int, head_dim: int, had_block: int) -> tuple[int, int]:
    """(tokens per program, warps). >= 16 rows keeps the rotation's tl.dot legal at any
    had_block (rows * d/2 / b >= 16); large writes take 32 rows per program, which measured
    fastest on the H100 (8 warps or 64 rows were 1.5-3x slower)."""
    if num_tokens >= 4096 and head_dim <= 128:
        return 32, 4
    return 16, 4


def cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    pages: KVPages,
    slot_mapping: torch.Tensor,
    fmt: PageFormat,
    k_mean: torch.Tensor | None = None,
    *,
    block_t: int | None = None,
    num_warps: int | None = None,
    check: bool = True,
    group_path: bool = True,
    rotation: str | None = None,
) -> None:
    """Center, rotate, quantize and scatter new K/V tokens into one layer's pages (in place).

    Args:
        k, v: ``[num_tokens, num_kv_heads, head_dim]`` bf16/fp16/fp32 (post-RoPE); the last dim
            must be contiguous.
        pages: :class:`KVPages` ``(k_cache, v_cache, k_meta, v_meta)`` of one layer in format
            ``fmt`` (``page_format.py``: codes ``[num_blocks, num_kv_heads, block_size,
            page_dim]``, fp16 (scale, min) metadata ``[..., 2]`` (``k_meta [..., 4]`` with
            ``fmt.k_half_meta``), None for bits=16).
        slot_mapping: ``[num_tokens]`` int32/int64, slot = block_id * block_size + offset;
            -1 skips the token (padding).
        fmt: the pages' :class:`PageFormat` (bits, had_block, rotate_v, k_half_meta, shapes).
        k_mean: ``[num_kv_heads, head_dim]`` key mean subtracted before rotating, or None.
        block_t, num_warps: tuning knobs (tokens per program, a power of two >= 16; warps);
            None picks them from the shape.
        check: validate the arguments. A caller that writes every layer of a step with the
            same shapes checks the first layer's call and skips the rest.
        group_path: INT4/INT8 pages: store whole 16-token groups as contiguous runs
            (``write_groups.py``; same bytes); False forces the per-token scatter.
        rotation: ``"exact16"`` (bf16/fp16 rows on 16-bit tensor cores; needs both k and v
            in one 16-bit dtype) or ``"tf32x3"`` (rows in fp32); None picks
            ``DEFAULT_ROTATION_16`` for 16-bit rows and tf32x3 otherwise. See ``rotation.py``;
            the two give the same codes up to fp32 rounding order.

    Keys are stored as ``R (k - mu)``, values as ``R v`` (``fmt.rotate_v``) or ``v``.

    Example::

        fmt = PageFormat(bits=4, head_dim=128, num_kv_heads=8, block_size=16, had_block=128)
        pages = fmt.empty_pages(num_blocks, "cuda")
        cache_write(k, v, pages, slot_mapping, fmt)
    """
    if check:
        _check(k, v, pages, slot_mapping, fmt, k_mean)
    num_tokens, head_dim, had_block = k.shape[0], fmt.head_dim, fmt.had_block
    if num_tokens == 0:
        return
    k_cache, v_cache, k_meta, v_meta = pages
    k_meta_arg = k_cache if k_meta is None else k_meta
    v_meta_arg = v_cache if v_meta is None else v_meta
    # v_meta's strides: k_meta's offsets are derived from them (tiles._k_meta_rows)
    meta_strides = (0, 0, 0) if v_meta is None else v_meta.stride()[:3]
    k_perm, v_perm = _perm_args(fmt.bits, head_dim, k.device)
    exact_ok = bool(had_block) and k.dtype in (torch.bfloat16, torch.float16) and v.dtype == k.dtype
    prec = DEFAULT_ROTATION_16 if exact_ok else "tf32x3"
    if rotation is not None:
        if rotation not in ("exact16", "tf32x3"):
            raise ValueError(f"rotation must be 'exact16' or 'tf32x3', got {rotation!r}")
        if rotation == "exact16" and not exact_ok:
            raise ValueError(
                "rotation='exact16' needs k and v both bf16 or both fp16, and had_block > 0"
            )
        prec = rotation
    if k_mean is not None and prec == "exact16":
        k_mean = rotated_mean(k_mean, had_block)
    if prec == "exact16" and _interpreting():
        prec = "exact16_emulated"
    args = (
        k, v, k_cache, v_cache, k_meta_arg, v_meta_arg, k_perm, v_perm, slot_mapping,
        k if k_mean is None else k_mean, num_tokens,
        1.0 / math.sqrt(had_block) if had_block else 1.0,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        0 if k_mean is None else k_mean.stride(0), *k_cache.stride()[:3], *meta_strides,
    )  # fmt: skip
    consts = dict(BLOCK_SIZE=fmt.block_size, D=head_dim, BITS=fmt.bits, HAD=had_block,
                  ROT_V=fmt.rotate_v, HAS_MEAN=k_mean is not None, PREC=prec,
                  K_HALF=fmt.k_half_meta)  # fmt: skip
    if group_path and fmt.bits != 16 and block_t is None:
        grid = (triton.cdiv(num_tokens, 16), fmt.num_kv_heads)
        _cache_write_groups_kernel[grid](*args, **consts, NONE=_NONE, num_warps=num_warps or 4)
        return
    auto_t, auto_w = _pick_launch(num_tokens, head_dim, had_block)
    block_t, num_warps = block_t or auto_t, num_warps or auto_w
    if block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two >= 16, got {block_t}")
    grid = (triton.cdiv(num_tokens, block_t), fmt.num_kv_heads)
    _cache_write_kernel[grid](*args, **consts, BLOCK_T=block_t, num_warps=num_warps)


_ROTATED_MEANS: dict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = {}


def rotated_mean(k_mean: torch.Tensor, had_block: int) -> torch.Tensor:
    """``R mu`` as fp32 ``[num_kv_heads, head_dim]`` for a key mean ``[num_kv_heads, head_dim]``.

    Cached per mean tensor (identity and version counter), so a layer's mean is rotated once,
    before any CUDA-graph capture, not on every write; the entry holds the mean, so its memory
    cannot be reused by another tensor while the entry lives. Inference tensors (means loaded
    under ``torch.inference_mode``) have no version counter and are taken as fixed."""
    key = (id(k_mean), had_block)
    version = None if k_mean.is_inference() else k_mean._version
    hit = _ROTATED_MEANS.get(key)
    if hit is not None and hit[0] is k_mean and hit[1] == version:
        return hit[2]
    mu = k_mean.float().contiguous()
    out = torch.empty_like(mu)
    rotate_cast(mu[:, None], had_block, out[:, None])
    if len(_ROTATED_MEANS) >= 1024:  # bounded: drop the oldest entries
        for old in list(_ROTATED_MEANS)[:256]:
            del _ROTATED_MEANS[old]
    _ROTATED_MEANS[key] = (k_mean, version, out)
    return out


def _check(k, v, pages, slot_mapping, fmt, k_mean) -> None:
    check_write_inputs(k, v, pages, slot_mapping, fmt, k_mean)
    if k.device.type != "cuda" and not _interpreting():
        raise ValueError(f"cache_write needs CUDA tensors (or TRITON_INTERPRET=1), got {k.device}")
    if fmt.head_dim not in (64, 128, 256):
        raise ValueError(
            f"head_dim must be 64, 128 or 256 for the Triton kernels, got {fmt.head_dim}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    if k_mean is not None and k_mean.stride(-1) != 1:
        raise ValueError("k_mean must be contiguous in its last dim")


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# write_groups builds on this module's helpers, so it is imported once they exist (not per call)
from sawkv.kernels.write_groups import _NONE, _cache_write_groups_kernel  # noqa: E402

__all__ = ["cache_write"]
