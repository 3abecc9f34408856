"""The fused Triton cache_write kernel against the torch reference (TRITON_INTERPRET=1).

Allowed differences, and why: the kernel rotates with a ±1 matrix product (tl.dot) while the
oracle runs butterflies, so fp32 sums are rounded in another order. A rotated value that sits
within an ulp of a quantization boundary (code + 0.5) may round to the neighbouring code (±1),
and a min/max that sits within an ulp of an fp16 rounding tie may be stored one fp16 ulp apart.
Both are rare (a handful of codes per thousand at most); without rotation the bytes match
exactly. Everything outside the written slots must stay untouched.
"""

from __future__ import annotations

import pytest
import torch
from paged_setup import empty_pages

from sawkv.attention.reference import cache_write_ref
from sawkv.kernels import PageFormat, cache_write
from sawkv.quant import unpack_int4

# Pairwise-style grid: every head_dim, block_size, had_block (0, 16 .. head_dim), bits and
# input dtype appears; tokens are not multiples of the block size. k_half: keys with one
# (scale, min) per half (k_half_meta), INT4 and INT8, d=64 and d=128, with and without
# rotation and centering.
# (head_dim, num_kv_heads, num_tokens, block_size, bits, had_block, rotate_v, k_mean, dtype,
#  k_half)
CASES = [
    (64, 2, 37, 16, 4, 0, False, False, torch.float32, False),
    (64, 1, 20, 32, 4, 64, True, True, torch.float16, False),
    (64, 2, 9, 64, 8, 16, False, True, torch.float32, False),
    (128, 2, 33, 16, 4, 128, False, True, torch.float32, False),
    (128, 1, 17, 32, 16, 32, True, True, torch.float32, False),
    (128, 2, 40, 64, 8, 0, False, False, torch.float16, False),
    (128, 1, 18, 16, 8, 64, True, False, torch.float16, False),
    (256, 1, 19, 16, 4, 256, True, True, torch.float32, False),
    (256, 1, 5, 32, 16, 0, False, False, torch.float16, False),
    (256, 2, 21, 64, 4, 16, False, False, torch.float32, False),
    (256, 1, 11, 16, 8, 128, False, True, torch.float32, False),
    (64, 2, 37, 16, 4, 64, True, True, torch.float32, True),
    (64, 1, 20, 32, 8, 0, False, False, torch.float16, True),
    (128, 2, 33, 16, 4, 0, False, True, torch.float32, True),
    (128, 1, 18, 16, 8, 32, False, False, torch.float32, True),
]


def _codes(pages, bits):
    return unpack_int4(pages).int() if bits == 4 else pages.int()


def _fp16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of b's fp16 spacing (NaN-free inputs)."""
    ulp = torch.finfo(torch.float16).eps * b.float().abs().clamp_min(6.1e-5)
    return (a.float() - b.float()).abs() / ulp


def _write_both(d, h, n, bs, bits, had, rot_v, mean, dtype, slots=None, k_half=False):
    g = torch.Generator().manual_seed(d + n)
    k = (3 * torch.randn(n, h, d, generator=g) + torch.randn(h, d, generator=g)).to(dtype)
    v = torch.randn(n, h, d, generator=g).to(dtype)
    k_mean = k.float().mean(0) if mean else None
    num_blocks = (n + bs - 1) // bs + 2
    if slots is None:
        slots = torch.randperm(num_blocks * bs, generator=g)[:n].int()
        slots[n // 2] = -1  # padding token: skipped
    if k_half:  # halves of different ranges, so a shared (scale, min) would differ
        k[..., d // 2 :] *= 4
    page_dtype = dtype if bits == 16 else torch.float32
    ours = empty_pages(num_blocks, h, bs, d, bits, page_dtype, k_half=k_half)
    ref = type(ours)(*(None if t is None else t.clone() for t in ours))
    fmt = PageFormat(bits, d, h, bs, had, rot_v, page_dtype if bits == 16 else None, k_half)
    cache_write(k, v, ours, slots, fmt, k_mean)
    cache_write_ref(k, v, ref, slots, fmt, k_mean)
    return ours, ref


@pytest.mark.parametrize("d, h, n, bs, bits, had, rot_v, mean, dtype, k_half", CASES)
def test_cache_write_matches_reference(d, h, n, bs, bits, had, rot_v, mean, dtype, k_half):
    ours, ref = _write_both(d, h, n, bs, bits, had, rot_v, mean, dtype, k_half=k_half)
    for page, want in zip(ours[:2], ref[:2]):
        if bits == 16:
            # float pages: the rotated value itself, equal up to fp32 summation order
            finite = ~want.isnan()
            assert torch.equal(page.isnan(), want.isnan())  # untouched slots stay garbage
            torch.testing.assert_close(page[finite], want[finite], rtol=1e-3, atol=1e-5)
            continue
        diff = (_codes(page, bits) - _codes(want, bits)).abs()
        if had == 0:
            assert torch.equal(page, want)
        else:
            assert diff.max() <= 1
            assert (diff > 0).float().mean() < 5e-3
    for meta, want in zip(ours[2:], ref[2:]):
        if meta is None:
            continue
        assert torch.equal(meta.isnan(), want.isnan())
        written = ~want.isnan()
        ulps = _fp16_ulps(meta[written], want[written])
        assert ulps.max() <= (0 if had == 0 else 1.0)


def _prefill_slots(chunks, bs, num_blocks, seed):
    """Slots of a batch of prefill chunks: sequence i writes positions ``start .. start + n``
    of its own shuffled pages; -1 padding between sequences."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks, generator=g).tolist()
    out = []
    for start, n in chunks:
        pages = [free.pop() for _ in range((start + n + bs - 1) // bs)]
        pos = torch.arange(start, start + n)
        out.append(torch.tensor(pages)[pos // bs] * bs + pos % bs)
        out.append(torch.tensor([-1]))
    return torch.cat(out).int()


# (head_dim, block_size, bits, had_block, rotate_v, chunks (start, length) per sequence,
#  k_half)
GROUP_CASES = [
    (64, 16, 4, 0, False, [(0, 48), (5, 40), (16, 3)], False),
    (128, 32, 4, 128, True, [(0, 37), (30, 50), (0, 16)], False),
    (128, 16, 8, 0, False, [(7, 41), (0, 33)], False),
    (256, 64, 8, 64, True, [(0, 70), (1, 15)], False),
    (64, 32, 8, 32, False, [(3, 60)], False),
    (256, 16, 4, 256, False, [(16, 33), (0, 5)], False),
    (64, 16, 4, 0, False, [(0, 48), (5, 40), (16, 3)], True),
    (128, 32, 8, 128, True, [(0, 37), (0, 16)], True),
]


@pytest.mark.parametrize("d, bs, bits, had, rot_v, chunks, k_half", GROUP_CASES)
def test_group_path_matches_reference_and_token_path(d, bs, bits, had, rot_v, chunks, k_half):
    """Prefill-shaped slot maps (whole groups, ragged starts and ends, padding, groups split
    across tiles) through the group path: the same bytes as the reference (as above) and,
    without rotation, exactly the per-token path's."""
    h = 2
    num_blocks = sum((s + n + bs - 1) // bs for s, n in chunks) + 3
    slots = _prefill_slots(chunks, bs, num_blocks, seed=d + bits)
    n = slots.numel()
    g = torch.Generator().manual_seed(n)
    k = 3 * torch.randn(n, h, d, generator=g) + 1
    k[..., : d // 2] *= 3  # halves of different ranges (k_half stores one pair for each)
    v = torch.randn(n, h, d, generator=g)
    k_mean = k.mean(0)
    fmt = PageFormat(bits, d, h, bs, had, rot_v, k_half_meta=k_half)
    pages = [empty_pages(num_blocks, h, bs, d, bits, torch.float32, seed=1, k_half=k_half)
             for _ in range(3)]  # fmt: skip
    ours, tokens, ref = pages
    cache_write(k, v, ours, slots, fmt, k_mean)
    cache_write(k, v, tokens, slots, fmt, k_mean, group_path=False)
    cache_write_ref(k, v, ref, slots, fmt, k_mean)
    for page, want, tok in zip(ours[:2], ref[:2], tokens[:2]):
        diff = (_codes(page, bits) - _codes(want, bits)).abs()
        assert diff.max() <= (0 if had == 0 else 1)
        assert (diff > 0).float().mean() < 5e-3
        if had == 0:
            assert torch.equal(page, tok)
    for meta, want in zip(ours[2:], ref[2:]):
        assert torch.equal(meta.isnan(), want.isnan())  # every written token, nothing else
        written = ~want.isnan()
        assert _fp16_ulps(meta[written], want[written]).max() <= (0 if had == 0 else 1.0)


# 16-bit inputs rotate on 16-bit tensor cores ("exact16": k, v rotated as loaded, the rotated
# key mean subtracted afterwards); fp32 inputs take the tf32x3 dot. Both against the reference.
# (head_dim, bits, had_block, rotate_v, dtype, k_half)
EXACT16_CASES = [
    (128, 4, 128, True, torch.bfloat16, False),  # had == d: two dots, then (a + b, a - b)
    (128, 4, 64, False, torch.bfloat16, False),
    (64, 8, 64, True, torch.float16, False),
    (256, 4, 256, False, torch.bfloat16, False),
    (256, 4, 32, True, torch.float16, False),
    (64, 4, 64, True, torch.bfloat16, True),
]


@pytest.mark.parametrize("d, bits, had, rot_v, dtype, k_half", EXACT16_CASES)
@pytest.mark.parametrize("group_path", [True, False])
def test_exact16_rotation_matches_reference(d, bits, had, rot_v, dtype, k_half, group_path):
    h, bs = 2, 16
    chunks = [(0, 37), (5, 20)]
    num_blocks = sum((s + n + bs - 1) // bs for s, n in chunks) + 3
    slots = _prefill_slots(chunks, bs, num_blocks, seed=d + had)
    n = slots.numel()
    g = torch.Generator().manual_seed(n + had)
    # keys with a large per-channel offset: centering matters and R mu is far from 0
    k = (2 * torch.randn(n, h, d, generator=g) + 8 * torch.randn(h, d, generator=g)).to(dtype)
    v = torch.randn(n, h, d, generator=g).to(dtype)
    k_mean = k.float().mean(0)
    fmt = PageFormat(bits, d, h, bs, had, rot_v, k_half_meta=k_half)
    ours, ref, tf32 = (empty_pages(num_blocks, h, bs, d, bits, torch.float32, k_half=k_half)
                       for _ in range(3))  # fmt: skip
    cache_write(k, v, ours, slots, fmt, k_mean, group_path=group_path, rotation="exact16")
    cache_write(k, v, tf32, slots, fmt, k_mean, group_path=group_path, rotation="tf32x3")
    cache_write_ref(k, v, ref, slots, fmt, k_mean)
    for page, want, other in zip(ours[:2], ref[:2], tf32[:2]):
        for got in (page, other):
            diff = (_codes(got, bits) - _codes(want, bits)).abs()
            assert diff.max() <= 1
            assert (diff > 0).float().mean() < 5e-3
    for meta, want in zip(ours[2:], ref[2:]):
        assert torch.equal(meta.isnan(), want.isnan())
        written = ~want.isnan()
        assert _fp16_ulps(meta[written], want[written]).max() <= 1.0


def test_exact16_refuses_fp32_and_caches_the_rotated_mean():
    from sawkv.kernels.cache_write import rotated_mean
    from sawkv.quant.hadamard import rotate

    fmt = PageFormat(4, 64, 1, 16, 64, False)
    pages = empty_pages(2, 1, 16, 64, 4, torch.float32)
    k = torch.randn(3, 1, 64)
    with pytest.raises(ValueError, match="exact16"):
        cache_write(k, k, pages, torch.arange(3).int(), fmt, rotation="exact16")
    with pytest.raises(ValueError, match="rotation must be"):
        cache_write(k, k, pages, torch.arange(3).int(), fmt, rotation="bf16")
    mu = torch.randn(2, 64)
    first = rotated_mean(mu, 64)
    torch.testing.assert_close(first, rotate(mu, 64))
    assert rotated_mean(mu, 64) is first  # cached
    mu.add_(1.0)  # in-place change bumps the version: recomputed
    torch.testing.assert_close(rotated_mean(mu, 64), rotate(mu, 64))


def test_group_path_checks_every_slot_of_a_run():
    """A run whose first and last slots look like a whole group but whose middle is shuffled
    must not be stored as one: each token still lands in its own slot."""
    d, bs = 64, 16
    slots = torch.arange(32).int()
    slots[3], slots[9] = 9, 3  # still starts at 0 mod 16 and ends 15 later
    k = torch.randn(32, 1, d)
    v = torch.randn(32, 1, d)
    ours = empty_pages(3, 1, bs, d, 4)
    ref = type(ours)(*(t.clone() for t in ours))
    fmt = PageFormat(4, d, 1, bs)
    cache_write(k, v, ours, slots, fmt)
    cache_write_ref(k, v, ref, slots, fmt)
    for a, b in zip(ours, ref):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_awkward_values_match_reference_exactly():
    """NaN -> 0, +-inf saturate to +-65504, constant rows get scale 0 (no division by zero)."""
    k = torch.randn(4, 1, 64)
    k[0, 0, 3] = float("nan")
    k[1, 0, :5] = float("inf")
    k[1, 0, 5:9] = -1e30
    k[2] = 0.75  # zero-range row
    k[3, 0, 32:] = -2.0  # a zero-range half of a row whose other half is not
    v = k.flip(0).clone()
    slots = torch.tensor([0, 1, 17, 30])
    for bits, k_half in ((4, False), (8, False), (4, True), (8, True)):
        ours = empty_pages(2, 1, 16, 64, bits, k_half=k_half)
        ref = type(ours)(*(t.clone() for t in ours))
        fmt = PageFormat(bits=bits, head_dim=64, num_kv_heads=1, block_size=16,
                         k_half_meta=k_half)  # fmt: skip
        cache_write(k, v, ours, slots, fmt)
        cache_write_ref(k, v, ref, slots, fmt)
        for a, b in zip(ours, ref):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_int64_slots_and_all_padding():
    ours, ref = _write_both(64, 1, 8, 16, 4, 32, False, True, torch.float32)
    k = torch.randn(3, 1, 64)
    before = [t.clone() for t in ours]
    slots = torch.full((3,), -1, dtype=torch.int64)
    cache_write(k, k, ours, slots, PageFormat(4, 64, 1, 16, had_block=32))
    for a, b in zip(ours, before):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_launcher_validation():
    k = torch.randn(3, 2, 64)
    pages = empty_pages(4, 2, 16, 64, 4)
    slots = torch.arange(3)
    fmt = PageFormat(bits=4, head_dim=64, num_kv_heads=2, block_size=16)
    with pytest.raises(ValueError, match="k_cache last dim"):
        cache_write(k, k, empty_pages(4, 2, 16, 64, 8), slots, fmt)
    with pytest.raises(ValueError, match="had_block"):
        PageFormat(bits=4, head_dim=64, num_kv_heads=2, block_size=16, had_block=48)
    with pytest.raises(ValueError, match="rotate_v"):
        PageFormat(bits=4, head_dim=64, num_kv_heads=2, block_size=16, rotate_v=True)
    with pytest.raises(ValueError, match="block_size"):
        PageFormat(bits=4, head_dim=64, num_kv_heads=2, block_size=8)
    with pytest.raises(ValueError, match="dtype"):
        PageFormat(bits=16, head_dim=64, num_kv_heads=2, block_size=16)
    with pytest.raises(ValueError, match="k_mean"):
        cache_write(k, k, pages, slots, fmt, torch.zeros(2, 32))
    with pytest.raises(ValueError, match="KV heads"):
        cache_write(k[:, :1], k[:, :1], pages, slots, fmt)
    with pytest.raises(ValueError, match="slot_mapping"):
        cache_write(k, k, pages, slots.float(), fmt)
    with pytest.raises(ValueError, match="head_dim"):
        k96 = torch.randn(3, 2, 96)
        fmt96 = PageFormat(bits=4, head_dim=96, num_kv_heads=2, block_size=16)
        cache_write(k96, k96, empty_pages(4, 2, 16, 96, 4), slots, fmt96)
    with pytest.raises(ValueError, match="k_meta"):
        kc, vc, km, vm = pages
        cache_write(k, k, (kc, vc, km.float(), vm), slots, fmt)
