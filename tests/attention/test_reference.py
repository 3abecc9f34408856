"""The torch reference of the paged-cache contracts against sawkv.quant (no triton involved).

The key check: attention computed by the reference over the pages equals plain softmax attention
over ``KVMethod.fake_quant`` keys/values (model space, un-rotated query) for the same stored bytes,
so rotation of q, key centering and rotating the output back are all exact up to fp32 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from sawkv.attention.reference import (
    cache_write_ref,
    paged_attention_decode_ref,
    paged_attention_extend_ref,
)
from sawkv.kernels import KVPages, PageFormat
from sawkv.kernels.page_layout import from_pages
from sawkv.quant import parse_method


def _bits(method) -> int:
    return method.bits if method.kind == "int" else 16


def build(method_name, lens, *, head_dim=64, num_kv_heads=2, block_size=16, seed=0, mean=True):
    """Write random K/V of ``lens`` sequences into shuffled pages with cache_write_ref.

    Returns a dict with the pages, block tables, seq_lens, the raw k/v/k_mean and slots."""
    g = torch.Generator().manual_seed(seed)
    m = parse_method(method_name, head_dim)
    bits = _bits(m)
    total = sum(lens)
    num_blocks = sum(math.ceil(n / block_size) for n in lens) + 3
    k = torch.randn(total, num_kv_heads, head_dim, generator=g) * 2
    k += 4 * torch.randn(num_kv_heads, head_dim, generator=g)  # a shared offset to center away
    v = torch.randn(total, num_kv_heads, head_dim, generator=g)
    k_mean = k.mean(0) if mean else None
    shape = (num_blocks, num_kv_heads, block_size)
    if bits == 16:
        kc, vc, km, vm = torch.zeros(*shape, head_dim), torch.zeros(*shape, head_dim), None, None
    else:
        p = head_dim // 2 if bits == 4 else head_dim
        kc = torch.randint(0, 256, (*shape, p), dtype=torch.uint8, generator=g)
        vc = torch.randint(0, 256, (*shape, p), dtype=torch.uint8, generator=g)
        # garbage: never read
        km = torch.full((*shape, 4 if m.k_half_meta else 2), float("nan"), dtype=torch.float16)
        vm = torch.full((*shape, 2), float("nan"), dtype=torch.float16)
    perm = torch.randperm(num_blocks, generator=g).int()
    max_blocks = max(math.ceil(n / block_size) for n in lens) + 1
    tables = torch.full((len(lens), max_blocks), -1, dtype=torch.int32)
    slots, c = [], 0
    for s, n in enumerate(lens):
        nb = math.ceil(n / block_size)
        tables[s, :nb] = perm[c : c + nb]
        c += nb
        pos = torch.arange(n)
        slots.append(tables[s, pos // block_size].long() * block_size + pos % block_size)
    slot_mapping = torch.cat(slots)
    fmt = PageFormat(bits, head_dim, num_kv_heads, block_size, m.had_block or 0, m.rotate_v,
                     torch.float32 if bits == 16 else None, m.k_half_meta)  # fmt: skip
    kmu = k_mean if m.center_k else None
    pages = KVPages(kc, vc, km, vm)
    cache_write_ref(k, v, pages, slot_mapping, fmt, kmu)
    return dict(
        method=m, pages=pages, tables=tables, k=k, v=v, k_mean=kmu, fmt=fmt,
        seq_lens=torch.tensor(lens, dtype=torch.int32), slots=slot_mapping, lens=lens,
    )  # fmt: skip


def fake_kv(case):
    """Model-space K/V that attention sees, straight from sawkv.quant."""
    m, k, v = case["method"], case["k"], case["v"]
    if m.kind != "int":
        return k, v
    return (
        m.fake_quant(k, is_key=True, k_mean=case["k_mean"]),
        m.fake_quant(v, is_key=False),
    )


def softmax_attention(q, k, v, scale, qpos, window=0):
    """q ``[M, Hq, d]`` at positions ``qpos [M]``; k, v ``[L, Hkv, d]``; causal (+ window)."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("mhd,lhd->hml", q.double(), kk.double()) * scale
    pos = torch.arange(k.shape[0])
    allowed = pos[None, :] <= qpos[:, None]
    if window:
        allowed &= pos[None, :] > qpos[:, None] - window
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hml,lhd->mhd", s.softmax(-1), vv.double()).float()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


METHODS = ["int4", "int4-bdr16-kc", "int4-bdr64-kv-kc", "int8-bdr32", "int8-kc", "bf16",
           "int4-bdr64-kv-kc-kh", "int8-kh"]  # fmt: skip


@pytest.mark.parametrize("name", [n for n in METHODS if n != "bf16"])
def test_write_bytes_match_encode(name):
    case = build(name, [37, 5, 20], mean=True)
    m, (kc, vc, km, vm) = case["method"], case["pages"]
    bs = kc.shape[2]
    blk, off = case["slots"] // bs, case["slots"] % bs
    ek = m.encode(case["k"], is_key=True, k_mean=case["k_mean"])
    ev = m.encode(case["v"], is_key=False)
    # pages hold rows byte-permuted in 16-token groups; tests/kernels/test_page_layout.py checks
    # that order against the tensor-core fragment definition
    kc, vc = from_pages(kc, m.bits, True), from_pages(vc, m.bits, False)
    assert torch.equal(kc[blk, :, off], ek.data)
    assert torch.equal(vc[blk, :, off], ev.data)
    # one (scale, min) per row, or with -kh (scale_lo, min_lo, scale_hi, min_hi) for keys
    assert torch.equal(km[blk, :, off], ek.meta.flatten(-2))
    assert torch.equal(vm[blk, :, off], ev.meta[..., 0, :])
    assert km.shape[-1] == (4 if m.k_half_meta else 2)


def test_write_skips_negative_slots():
    case = build("int4-bdr32", [20])
    kc, vc, km, vm = (t.clone() for t in case["pages"])
    before = kc.clone()
    slots = torch.full((3,), -1, dtype=torch.int64)
    k = torch.randn(3, 2, 64)
    cache_write_ref(k, k, KVPages(kc, vc, km, vm), slots, PageFormat(4, 64, 2, 16, had_block=32))
    assert torch.equal(kc, before)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("window", [0, 9])
def test_decode_equals_attention_over_fake_quant(name, window):
    lens = [37, 1, 64, 50]
    case = build(name, lens, num_kv_heads=2)
    q = torch.randn(len(lens), 8, 64)  # GQA ratio 4
    scale = 64**-0.5
    out = paged_attention_decode_ref(
        q, case["pages"], case["tables"], case["seq_lens"], case["fmt"], scale=scale,
        sliding_window=window,
    )  # fmt: skip
    fk, fv = fake_kv(case)
    start = 0
    for s, n in enumerate(lens):
        sl = slice(start, start + n)
        want = softmax_attention(q[s : s + 1], fk[sl], fv[sl], scale, torch.tensor([n - 1]), window)
        torch.testing.assert_close(out[s : s + 1], want, rtol=1e-5, atol=2e-5)
        start += n


@pytest.mark.parametrize("name", ["int4-bdr64-kv-kc", "int8", "bf16", "int4-bdr32-kc-kh"])
def test_extend_equals_causal_attention_over_fake_quant(name):
    lens, q_lens = [37, 5, 70], [10, 5, 1]
    case = build(name, lens, num_kv_heads=1)
    qsl = torch.tensor([0, 10, 15, 16], dtype=torch.int32)
    q = torch.randn(16, 2, 64)
    scale = 0.1
    out = paged_attention_extend_ref(
        q, case["pages"], case["tables"], case["seq_lens"], qsl, case["fmt"], scale=scale,
        sliding_window=12,
    )  # fmt: skip
    fk, fv = fake_kv(case)
    start = 0
    for s, (n, ql) in enumerate(zip(lens, q_lens)):
        sl, qs = slice(start, start + n), slice(int(qsl[s]), int(qsl[s + 1]))
        want = softmax_attention(q[qs], fk[sl], fv[sl], scale, torch.arange(n - ql, n), 12)
        torch.testing.assert_close(out[qs], want, rtol=1e-5, atol=2e-5)
        start += n


def test_extend_last_token_matches_decode():
    case = build("int4-bdr32-kv-kc", [40, 17], num_kv_heads=2)
    qsl = torch.tensor([0, 40, 57], dtype=torch.int32)
    q = torch.randn(57, 4, 64)
    args = (case["pages"], case["tables"], case["seq_lens"])
    ext = paged_attention_extend_ref(q, *args, qsl, case["fmt"], scale=0.125)
    dec = paged_attention_decode_ref(q[[39, 56]], *args, case["fmt"], scale=0.125)
    torch.testing.assert_close(ext[[39, 56]], dec, rtol=1e-5, atol=1e-5)


def test_key_centering_is_exact_for_attention():
    """Float pages hold R(k - mu) with no quantization noise: the output must not depend on mu."""
    case = build("bf16", [30, 9])
    q = torch.randn(2, 4, 64)
    outs = []
    for mu in (case["k"].mean(0), None):
        kc, vc = torch.zeros_like(case["pages"][0]), torch.zeros_like(case["pages"][1])
        pages = KVPages(kc, vc, None, None)
        fmt = PageFormat(16, 64, 2, 16, had_block=64, dtype=torch.float32)
        cache_write_ref(case["k"], case["v"], pages, case["slots"], fmt, mu)
        outs.append(
            paged_attention_decode_ref(q, pages, case["tables"], case["seq_lens"], fmt, scale=0.125)
        )
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, tol", [("int8-bdr64-kc", 0.02), ("int4-bdr64-kc", 0.2)])
def test_centered_cache_matches_uncentered_attention(name, tol):
    """With quantization the centered cache differs from exact attention over the un-centered
    keys only by quantization noise (INT8: ~16x less than INT4)."""
    case = build(name, [64], num_kv_heads=1, mean=True)
    q = torch.randn(1, 1, 64) * 0.3
    out = paged_attention_decode_ref(
        q, case["pages"], case["tables"], case["seq_lens"], case["fmt"], scale=0.125
    )
    exact = softmax_attention(q, case["k"], case["v"], 0.125, torch.tensor([63]))
    rel = (out - exact).norm() / exact.norm()
    assert rel < tol, rel


def test_validation_errors():
    case = build("int4", [20])
    kc, vc, km, vm = pages = case["pages"]
    fmt, tables, seq_lens = case["fmt"], case["tables"], case["seq_lens"]
    q = torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention_decode_ref(q[:, :3], pages, tables, seq_lens, fmt, scale=0.1)
    with pytest.raises(ValueError, match="had_block"):
        PageFormat(4, 64, 2, 16, had_block=24)
    with pytest.raises(ValueError, match="k_meta"):
        paged_attention_decode_ref(q, (kc, vc, km[..., :1], vm), tables, seq_lens, fmt, scale=0.1)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_decode_ref(q, pages, tables.long(), seq_lens, fmt, scale=0.1)
    with pytest.raises(ValueError, match="last dim"):
        paged_attention_decode_ref(q, pages, tables, seq_lens, PageFormat(8, 64, 2, 16), scale=0.1)
    with pytest.raises(ValueError, match="fmt"):
        paged_attention_decode_ref(q, pages, tables, seq_lens, None, scale=0.1)
    with pytest.raises(ValueError, match="slot_mapping"):
        cache_write_ref(q[:, :2], q[:, :2], pages, torch.zeros(1, dtype=torch.int16), fmt)
    # pages of one (scale, min) per key read as a per-half format, and the reverse
    kh = PageFormat(4, 64, 2, 16, k_half_meta=True)
    with pytest.raises(ValueError, match="k_meta last dim 2 does not fit.*k_half_meta=True"):
        paged_attention_decode_ref(q, pages, tables, seq_lens, kh, scale=0.1)
    km4 = torch.zeros((*km.shape[:-1], 4), dtype=torch.float16)
    with pytest.raises(ValueError, match="k_meta last dim 4"):
        paged_attention_decode_ref(q, (kc, vc, km4, vm), tables, seq_lens, fmt, scale=0.1)
    with pytest.raises(ValueError, match="v_meta last dim 4"):
        paged_attention_decode_ref(q, (kc, vc, km4, km4), tables, seq_lens, kh, scale=0.1)
    with pytest.raises(ValueError, match="k_half_meta.*needs INT4/INT8"):
        PageFormat(16, 64, 2, 16, dtype=torch.float16, k_half_meta=True)


def test_page_format_sizes_match_the_tensors():
    """page_size_bytes counts exactly the bytes of one block index of the allocated pages."""
    for fmt in (PageFormat(4, 128, 8, 16, had_block=128, rotate_v=True), PageFormat(8, 64, 2, 32),
                PageFormat(16, 64, 2, 16, dtype=torch.bfloat16),
                PageFormat(4, 64, 2, 16, had_block=64, k_half_meta=True),
                PageFormat(8, 128, 1, 16, k_half_meta=True)):  # fmt: skip
        pages = fmt.empty_pages(3)
        per_block = sum(t[0].numel() * t.element_size() for t in pages if t is not None)
        assert fmt.page_size_bytes == per_block
        assert pages.k_cache.shape == fmt.page_shape(3)
        assert (pages.k_meta is None) == (fmt.bits == 16)
        if fmt.k_half_meta:  # 4 fp16 per key (lo and hi halves), 2 per value
            assert pages.k_meta.shape[-1] == 4 and pages.v_meta.shape[-1] == 2
    # the bits a -kh method is accounted at are what its pages hold: (4 + 64/d + 4 + 32/d) / 2
    kh = PageFormat(4, 64, 2, 16, k_half_meta=True)
    m = parse_method("int4-kh", 64)
    assert kh.page_size_bytes * 8 == m.bits_per_element(64) * 2 * 64 * 2 * 16
