"""Random paged-cache cases shared by the kernel tests (pages written by the torch reference)."""

from __future__ import annotations

import math

import torch

from sawkv.attention.reference import cache_write_ref
from sawkv.kernels import KVPages, PageFormat


def empty_pages(num_blocks, num_kv_heads, block_size, head_dim, bits, dtype=torch.float32, seed=0,
                k_half=False):  # fmt: skip
    """Pages filled with garbage (random codes, NaN metadata) that attention must never read;
    ``k_half``: key metadata of a ``k_half_meta`` format (4 fp16 per row)."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, num_kv_heads, block_size)
    if bits == 16:
        k = torch.full((*shape, head_dim), float("nan"), dtype=dtype)
        return KVPages(k, k.clone(), None, None)
    p = head_dim // 2 if bits == 4 else head_dim
    k = torch.randint(0, 256, (*shape, p), dtype=torch.uint8, generator=g)
    v = torch.randint(0, 256, (*shape, p), dtype=torch.uint8, generator=g)
    k_meta = torch.full((*shape, 4 if k_half else 2), float("nan"), dtype=torch.float16)
    return KVPages(k, v, k_meta, torch.full((*shape, 2), float("nan"), dtype=torch.float16))


def paged_case(lens, *, head_dim, num_kv_heads, block_size, bits, had_block, rotate_v,
               dtype=torch.float32, seed=0, with_mean=False, k_half=False):  # fmt: skip
    """K/V of ``lens`` sequences written by ``cache_write_ref`` into shuffled pages
    (``k_half``: a ``k_half_meta`` format).

    Returns ``(pages, block_tables, seq_lens, fmt)``, plus the key mean the pages are centered
    on (``[num_kv_heads, head_dim]`` fp32) with ``with_mean``; unused table entries are -1."""
    fmt = PageFormat(bits, head_dim, num_kv_heads, block_size, had_block, rotate_v,
                     dtype if bits == 16 else None, k_half)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    total = sum(lens)
    num_blocks = sum(math.ceil(n / block_size) for n in lens) + 2
    k = (2 * torch.randn(total, num_kv_heads, head_dim, generator=g) + 1).to(dtype)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g).to(dtype)
    k_mean = k.float().mean(0)
    pages = empty_pages(num_blocks, num_kv_heads, block_size, head_dim, bits, dtype, seed, k_half)
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
    cache_write_ref(k, v, pages, torch.cat(slots), fmt, k_mean)
    out = (pages, tables, torch.tensor(lens, dtype=torch.int32), fmt)
    return (*out, k_mean) if with_mean else out
