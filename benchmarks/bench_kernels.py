"""GPU benchmark of the paged-cache kernels (cache_write, split-K decode, extend) vs BF16 baselines.

Run on the H100 (``run`` tool)::

    PYTHONPATH=. python benchmarks/bench_kernels.py --out $OUT          # full run
    PYTHONPATH=. python benchmarks/bench_kernels.py --out $OUT --sweep  # + decode tuning sweep
    python benchmarks/bench_kernels.py --plot results.json              # plot locally

Order: (1) correctness of every kernel against the torch reference on the GPU (fresh random
inputs, poisoned outputs), (2) device copy bandwidth, (3) decode at the Qwen3-8B attention shape
(32 query heads, 8 KV heads, d=128, page size 16) for INT4, INT4-BDR128 (K), INT4-BDR128 K+V,
INT8, BF16 pages and torch SDPA on contiguous BF16 (``enable_gqa=True``), (4) the write kernel vs a
BF16 ``index_copy_`` scatter into the same page layout, (5) extend (2048-token chunk over 8K-32K
cached tokens) vs SDPA on dequantized BF16. Times are medians over calls with L2 flushed before
each by reading a 512 MB buffer (``SAWKV_BENCH_FLUSH=zero``: ``triton.testing.do_bench``'s
zero-fill, whose dirty lines the timed call pays to write back; results before 2026-12-08 used
it); inputs also rotate over several page sets so that no set fits in L2. Bytes counted for
decode: K/V codes + (scale, min) metadata + block tables + q + out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

import torch

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DECODE_SHAPES = [
    (1, 32768), (8, 32768), (32, 8192), (64, 8192), (128, 4096), (256, 2048), (1, 131072),
]  # fmt: skip
L2_BYTES = 50 * 2**20
# name -> (bits, had_block, rotate_v[, k_half_meta])
FORMATS = {
    "int4": (4, 0, False),
    "int4-bdr128": (4, 128, False),
    "int4-bdr128-kv": (4, 128, True),
    "int4-bdr128-kv-kh": (4, 128, True, True),  # per-half key metadata (saw-int4 recipes)
    "int8": (8, 0, False),
    "bf16": (16, 0, False),  # our kernel on BF16 pages
}


def fmt_args(name: str) -> tuple[int, int, bool, bool]:
    """(bits, had_block, rotate_v, k_half_meta) of a FORMATS entry."""
    bits, had, rot_v, *kh = FORMATS[name]
    return bits, had, rot_v, bool(kh and kh[0])


# ---- helpers -------------------------------------------------------------------------------------
FLUSH = os.environ.get("SAWKV_BENCH_FLUSH", "read")  # "read" (clean L2) or "zero" (do_bench)
_FLUSH_BUF: list[torch.Tensor] = []
_STREAM_BUF: list[torch.Tensor] = []


def _flush_l2() -> None:
    """Evict L2 by *reading* 512 MB. ``triton.testing.do_bench`` zero-fills a buffer instead,
    which leaves L2 (50 MB on an H100/H200) full of dirty lines that the timed call then has to
    write back to DRAM: ~17 µs of extra traffic that no serving step pays and that dominated the
    small decode shapes (a fixed ~30-40 µs in every INT4 decode time of 2026-12-07)."""
    if not _FLUSH_BUF:
        _FLUSH_BUF.append(torch.ones(2**27, dtype=torch.float32, device="cuda"))
        _FLUSH_BUF.append(torch.empty((), dtype=torch.float32, device="cuda"))
    torch.sum(_FLUSH_BUF[0], dim=0, out=_FLUSH_BUF[1])


def bench(fn, reps_ms: int = 200) -> float:
    """Median µs of ``fn``, L2 flushed before each call (``FLUSH``: "read" leaves it clean,
    "zero" is ``triton.testing.do_bench``'s dirty flush), ~``reps_ms`` of timed calls."""
    import triton.testing

    if FLUSH == "zero":
        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=reps_ms, return_mode="median")
    for _ in range(25):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        _flush_l2()
        fn()
    torch.cuda.synchronize()
    reps = max(10, min(1000, int(reps_ms * 1e-3 / ((time.perf_counter() - t0) / 5))))
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        _flush_l2()
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(start, end))
    return 1e3 * times[len(times) // 2]


def bench_graphs(fns, reps_ms: int = 200) -> float:
    """Median µs of one call, each input set's call captured in a CUDA graph and the graphs
    replayed in turn (L2 flushed by do_bench before each): what a serving engine's decode step
    pays, without the Python launch overhead that would otherwise exceed small kernels."""
    graphs = []
    for fn in fns:
        fn()  # compile and warm outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graphs.append(g)
    state = {"i": 0}

    def replay():
        state["i"] = (state["i"] + 1) % len(graphs)
        graphs[state["i"]].replay()

    return bench(replay, reps_ms)


def bench_stream(fns, evict: bool = False, min_calls: int = 16, reps_ms: int = 200) -> float:
    """Median µs per call when the calls run back to back inside one CUDA graph, cycling over
    the input sets, as a decode step's layers do. ``bench_graphs`` launches each call as its own
    graph, which adds a fixed ~13-15 µs of graph launch and ramp (a 256-token decode measures
    15-19 µs there) that a step pays once, not per layer.

    Sets that together exceed 4x L2 (``num_sets``) evict each other. Smaller ones would stay in
    L2, so with ``evict`` a 128 MB read runs before each call (as a step's weight reads do
    between layers) and the same graph of reads alone is subtracted."""
    reps = -(-min_calls // len(fns))
    flush = None
    if evict:
        if not _STREAM_BUF:  # one 128 MB buffer for every call, not one per call
            _STREAM_BUF.append(torch.ones(2**25, dtype=torch.float32, device="cuda"))
            _STREAM_BUF.append(torch.empty((), dtype=torch.float32, device="cuda"))
        buf, acc = _STREAM_BUF

        def flush():
            torch.sum(buf, dim=0, out=acc)

    def capture(with_calls: bool):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                for fn in fns:
                    if flush is not None:
                        flush()
                    if with_calls:
                        fn()
        return g

    for fn in fns:
        fn()
    torch.cuda.synchronize()
    total = bench(capture(True).replay, reps_ms)
    if flush is not None:
        total -= bench(capture(False).replay, reps_ms)
    return total / (reps * len(fns))


def make_pages(
    num_blocks: int,
    bits: int,
    head_dim: int = HEAD_DIM,
    num_kv_heads: int = NUM_KV_HEADS,
    block_size: int = BLOCK_SIZE,
    dtype=torch.bfloat16,
    k_half: bool = False,
):
    """Random but valid pages: codes anywhere, metadata small positive scales (``k_half``: keys
    with two (scale, min) pairs, the second half's scales 4x the first's)."""
    from sawkv.kernels import KVPages

    shape = (num_blocks, num_kv_heads, block_size)
    if bits == 16:
        k = torch.randn(*shape, head_dim, dtype=dtype, device="cuda")
        return KVPages(k, torch.randn_like(k), None, None)
    p = head_dim // 2 if bits == 4 else head_dim
    k = torch.randint(0, 256, (*shape, p), dtype=torch.uint8, device="cuda")
    v = torch.randint(0, 256, (*shape, p), dtype=torch.uint8, device="cuda")
    meta = torch.empty(*shape, 2, dtype=torch.float16, device="cuda")
    meta[..., 0].uniform_(0.01, 0.1)
    meta[..., 1].uniform_(-1.0, 0.0)
    k_meta = torch.cat([meta, meta * 4], -1) if k_half else meta.clone()
    return KVPages(k, v, k_meta, meta)


def page_format(
    bits: int,
    had: int,
    rot_v: bool,
    head_dim: int = HEAD_DIM,
    num_kv_heads: int = NUM_KV_HEADS,
    block_size: int = BLOCK_SIZE,
    dtype=torch.bfloat16,
    k_half: bool = False,
):
    """The :class:`PageFormat` of pages from :func:`make_pages` with the same arguments."""
    from sawkv.kernels import PageFormat

    return PageFormat(bits, head_dim, num_kv_heads, block_size, had, rot_v,
                      dtype if bits == 16 else None, k_half_meta=k_half)  # fmt: skip


def decode_bytes(batch: int, ctx: int, bits: int, k_half: bool = False) -> int:
    per_vec = HEAD_DIM * 2 if bits == 16 else HEAD_DIM * bits // 8 + 4
    kv = batch * ctx * NUM_KV_HEADS * (2 * per_vec + (4 if k_half else 0))
    tables = batch * math.ceil(ctx / BLOCK_SIZE) * 4
    q_out = 2 * batch * NUM_Q_HEADS * HEAD_DIM * 2
    return kv + tables + q_out


def num_sets(bytes_per_set: int) -> int:
    return max(1, min(8, math.ceil(4 * L2_BYTES / bytes_per_set)))


def git_commit() -> str:
    """HEAD, with ``+dirty`` when tracked files differ from it: the device machine runs a copy
    of the working tree whose ``.git`` may lag behind it, so HEAD alone can name the wrong code."""
    try:
        head = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
        dirty = subprocess.check_output(
            ["git", "status", "--porcelain", "--untracked-files=no"], text=True
        ).strip()
        return head + ("+dirty" if dirty else "")
    except Exception:
        return os.environ.get("SAWKV_COMMIT", "unknown")


def source_digest() -> str:
    """SHA-1 (12 hex digits) of the package's kernel and attention sources as they ran."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "sawkv"
    digest = hashlib.sha1()
    for sub in ("kernels", "attention", "quant"):
        for f in sorted((root / sub).rglob("*")):
            if f.suffix in (".py", ".cu", ".cuh"):
                digest.update(f.relative_to(root).as_posix().encode())
                digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


# ---- correctness ---------------------------------------------------------------------------------
def check_correctness() -> list[dict]:
    """Kernels vs the torch reference on the GPU at a few mixed shapes; raises on failure."""
    from sawkv.attention.reference import (
        cache_write_ref,
        paged_attention_decode_ref,
        paged_attention_extend_ref,
    )
    from sawkv.kernels import cache_write, paged_attention_decode, paged_attention_extend
    from sawkv.quant import unpack_int4

    rows = []
    cases = [
        # d, Hkv, G, bs, bits, had, rot_v, mean, lens, window[, k_half]
        (128, 8, 4, 16, 4, 128, False, True, [1, 37, 1000, 4099], 0),
        (128, 8, 4, 16, 4, 128, True, True, [300, 17], 0),
        (64, 2, 8, 32, 4, 16, False, False, [65, 129], 40),
        (256, 1, 16, 64, 8, 64, True, True, [200, 5], 0),
        (128, 4, 1, 16, 16, 0, False, False, [77, 1500], 0),
        (128, 2, 2, 16, 4, 0, False, False, [5000], 0),
        (128, 8, 4, 32, 8, 128, True, True, [1, 2000, 33], 0),
        (64, 3, 3, 16, 4, 64, True, True, [9000, 100], 0),
        (128, 2, 12, 16, 4, 128, False, True, [700], 100),
        # short sequences under a wide table: CUDA decode uses fewer splits than planned
        (128, 8, 4, 16, 4, 128, True, True, [1, 300, 17000], 0),
        # per-half key metadata: one and two query tiles, INT4 and INT8, a window
        (128, 8, 4, 16, 4, 128, True, True, [1, 37, 1000, 4099], 0, True),
        (128, 2, 12, 16, 8, 128, True, True, [700, 3], 100, True),
        (64, 2, 8, 32, 4, 64, False, True, [65, 2000], 0, True),
        (256, 1, 4, 16, 8, 128, True, True, [200, 5], 0, True),
    ]
    for d, h, g, bs, bits, had, rot_v, mean, lens, window, *kh in cases:
        k_half = bool(kh and kh[0])
        torch.manual_seed(len(rows))
        dev = "cuda"
        total = sum(lens)
        nb = sum(math.ceil(n / bs) for n in lens) + 4
        k = torch.randn(total, h, d, device=dev, dtype=torch.bfloat16) * 2 + 1
        v = torch.randn(total, h, d, device=dev, dtype=torch.bfloat16)
        k_mean = k.float().mean(0) if mean else None
        perm = torch.randperm(nb, device=dev).int()
        max_blocks = max(math.ceil(n / bs) for n in lens) + 1
        tables = torch.full((len(lens), max_blocks), -1, dtype=torch.int32, device=dev)
        slots, c = [], 0
        for s, n in enumerate(lens):
            m = math.ceil(n / bs)
            tables[s, :m] = perm[c : c + m]
            c += m
            slots.append(
                tables[s, torch.arange(n, device=dev) // bs].long() * bs
                + torch.arange(n, device=dev) % bs
            )
        slot_mapping = torch.cat(slots)
        row = dict(case=f"d{d} h{h} g{g} bs{bs} bits{bits} had{had} rv{rot_v} kc{mean}"
                        + (" kh" if k_half else ""))  # fmt: skip
        first = make_pages(nb, bits, d, h, bs, k_half=k_half)
        pages = [first, type(first)(*(None if t is None else t.clone() for t in first))]
        fmt = page_format(bits, had, rot_v, d, h, bs, k_half=k_half)
        cache_write(k, v, pages[0], slot_mapping, fmt, k_mean)
        cache_write_ref(k, v, pages[1], slot_mapping, fmt, k_mean)
        if had and bits != 16:  # the 16-bit rotation against the same reference
            alt = type(first)(*(None if t is None else t.clone() for t in first))
            cache_write(k, v, alt, slot_mapping, fmt, k_mean, rotation="exact16")
            ca, cb = (unpack_int4(x) if bits == 4 else x for x in (alt[0], pages[1][0]))
            va, vb = (unpack_int4(x) if bits == 4 else x for x in (alt[1], pages[1][1]))
            dk, dv = (ca.int() - cb.int()).abs(), (va.int() - vb.int()).abs()
            row["exact16_max_code_diff"] = float(max(dk.max(), dv.max()))
            row["exact16_frac_diff"] = float(max((dk > 0).float().mean(), (dv > 0).float().mean()))
        a, b = pages[0][0], pages[1][0]
        if bits == 4:
            a, b = unpack_int4(a), unpack_int4(b)
        diff = (a.int() - b.int()).abs() if bits != 16 else (a.float() - b.float()).abs()
        row["write_max_code_diff"] = float(diff.max())
        row["write_frac_diff"] = float((diff > 0).float().mean())
        if bits != 16:  # metadata difference in fp16 ulps (rounding ties of min/max, see kernel)
            ma, mb = pages[0][2].float(), pages[1][2].float()
            ulp = torch.finfo(torch.float16).eps * mb.abs().clamp_min(6.1e-5)
            row["meta_max_ulps"] = float(((ma - mb).abs() / ulp).max())
        qlens = [min(n, 300) for n in lens]
        q = torch.randn(sum(qlens), h * g, d, device=dev, dtype=torch.bfloat16)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32, device=dev)
        kw = dict(scale=d**-0.5, sliding_window=window)
        ref_pages = pages[1]
        qd = q[qsl[1:].long() - 1].contiguous()
        out = torch.full_like(qd, float("nan"))
        paged_attention_decode(qd, ref_pages, tables, seq_lens, fmt, out=out, **kw)
        ref = paged_attention_decode_ref(qd, ref_pages, tables, seq_lens, fmt, **kw).float()
        row["decode_rel_err"] = float((out.float() - ref).norm() / ref.norm())
        from sawkv.kernels.launch import KernelConfig

        out_t = torch.full_like(qd, float("nan"))
        cfg_t = KernelConfig(block_n=128, impl="triton")
        paged_attention_decode(qd, ref_pages, tables, seq_lens, fmt, out=out_t, config=cfg_t, **kw)
        row["decode_triton_rel_err"] = float((out_t.float() - ref).norm() / ref.norm())
        if d == 128 and bits in (4, 8):  # the CUDA kernel at 8 warps per CTA
            out_w = torch.full_like(qd, float("nan"))
            cfg_w = KernelConfig(cta_warps=8)
            paged_attention_decode(qd, ref_pages, tables, seq_lens, fmt, out=out_w, config=cfg_w,
                                   **kw)  # fmt: skip
            row["decode_w8_rel_err"] = float((out_w.float() - ref).norm() / ref.norm())
        oute = torch.full_like(q, float("nan"))
        paged_attention_extend(q, ref_pages, tables, seq_lens, qsl, fmt, out=oute, **kw)
        refe = paged_attention_extend_ref(q, ref_pages, tables, seq_lens, qsl, fmt, **kw).float()
        row["extend_rel_err"] = float((oute.float() - refe).norm() / refe.norm())
        ok = (
            row["write_max_code_diff"] <= (1 if bits != 16 else 0.02)
            and row["write_frac_diff"] < 1e-3
            and row.get("meta_max_ulps", 0) <= 1.01
            and row.get("exact16_max_code_diff", 0) <= 1
            and row.get("exact16_frac_diff", 0) < 1e-3
            and row["decode_rel_err"] < 5e-3
            and row["decode_triton_rel_err"] < 5e-3
            and row.get("decode_w8_rel_err", 0) < 5e-3
            and row["extend_rel_err"] < 5e-3
        )
        row["ok"] = bool(ok)
        print("check", row, flush=True)
        rows.append(row)
        if not ok:
            raise SystemExit(f"GPU correctness check failed: {row}")
    return rows


def check_long_context() -> list[dict]:
    """Decode vs the fp32 torch reference on the same pages at 2K-128K tokens, bf16 and fp16
    queries (the pages written by the fused write from keys with large channel offsets)."""
    from sawkv.attention.reference import paged_attention_decode_ref
    from sawkv.kernels import cache_write, paged_attention_decode
    from sawkv.kernels.launch import KernelConfig

    rows = []
    for ctx in (2048, 32768, 131072):
        blocks = math.ceil(ctx / BLOCK_SIZE)
        gen = torch.Generator(device="cuda").manual_seed(ctx)
        k = torch.randn(ctx, NUM_KV_HEADS, HEAD_DIM, device="cuda", generator=gen)
        k[..., :4] += 20.0  # outlier channels, as in Qwen keys
        v = torch.randn(ctx, NUM_KV_HEADS, HEAD_DIM, device="cuda", generator=gen)
        tables = torch.randperm(blocks, device="cuda", generator=gen).int()[None]
        pos = torch.arange(ctx, device="cuda")
        slots = tables[0, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
        seq_lens = torch.tensor([ctx], dtype=torch.int32, device="cuda")
        for name in ("int4-bdr128", "int4-bdr128-kv", "int4-bdr128-kv-kh", "int8"):
            bits, had, rot_v, kh = fmt_args(name)
            pages = make_pages(blocks, bits, k_half=kh)
            fmt = page_format(bits, had, rot_v, k_half=kh)
            cache_write(k.bfloat16(), v.bfloat16(), pages, slots, fmt)
            for dtype in (torch.bfloat16, torch.float16):
                q = torch.randn(1, NUM_Q_HEADS, HEAD_DIM, device="cuda", generator=gen).to(dtype)
                kw = dict(scale=HEAD_DIM**-0.5)
                ref = paged_attention_decode_ref(q, pages, tables, seq_lens, fmt, **kw).float()
                row = dict(method=name, context=ctx, dtype=str(dtype).split(".")[-1])
                for impl in ("auto", "triton"):
                    out = torch.full_like(q, float("nan"))
                    cfg = KernelConfig(**{**DECODE_CONFIG_DICT(), "impl": impl})
                    paged_attention_decode(q, pages, tables, seq_lens, fmt, out=out, config=cfg,
                                           **kw)  # fmt: skip
                    row[f"rel_err_{impl}"] = float((out.float() - ref).norm() / ref.norm())
                row["ok"] = row["rel_err_auto"] < 5e-3 and row["rel_err_triton"] < 5e-3
                print("long-context", row, flush=True)
                rows.append(row)
        del k, v
        torch.cuda.empty_cache()
    if not all(r["ok"] for r in rows):
        raise SystemExit("long-context decode error above 5e-3")
    return rows


def DECODE_CONFIG_DICT() -> dict:  # noqa: N802 - a constant's copy
    from sawkv.kernels.launch import DECODE_CONFIG

    return dict(DECODE_CONFIG.__dict__)


def sweep_cuda_decode(copy_gbs: float) -> list[dict]:
    """CUDA decode knobs: 16-token groups per warp step and forced split counts."""
    from sawkv.kernels.launch import KernelConfig

    rows = []
    for batch, ctx in ((1, 32768), (8, 32768), (32, 8192), (256, 2048)):
        for gps in (1, 2):
            for splits in (0, 1, 2, 4, 8, 16, 32, 48, 64):
                if splits and batch * NUM_KV_HEADS * splits > 8 * 132 * 4:
                    continue
                cfg = KernelConfig(**{**DECODE_CONFIG_DICT(), "groups_per_step": gps,
                                      "num_splits": splits})  # fmt: skip
                us = time_decode(batch, ctx, "int4-bdr128", cfg)
                pct = 100 * decode_bytes(batch, ctx, 4) / us / 1e3 / copy_gbs
                rows.append(dict(batch=batch, context=ctx, groups_per_step=gps, splits=splits,
                                 us=us, pct_copy=pct))  # fmt: skip
                print(f"cuda sweep B={batch} L={ctx} gps={gps} splits={splits}: {us:.1f} us "
                      f"{pct:.0f}%", flush=True)  # fmt: skip
    return rows


# ---- decode latency: few sequences, short spans, the engine's wide block tables --------------
LATENCY_SHAPES = [(1, 256), (1, 1024), (1, 4096), (1, 32768), (4, 1024), (16, 2048)]
# the serving runs' max_model_len: CUDA graphs plan decode splits from this table width
LATENCY_TABLE_TOKENS = 17920


def time_decode_latency(batch: int, ctx: int, name: str, config=None) -> tuple[float, float]:
    """(isolated, back-to-back) median µs of one decode call as a c=1..16 serving step launches
    it: block tables ``LATENCY_TABLE_TOKENS`` wide (the split count planned from that width),
    ``ctx`` tokens used, over several page sets (``bench_graphs`` / ``bench_stream``)."""
    from sawkv.kernels import paged_attention_decode

    bits, had, rot_v, kh = fmt_args(name)
    sets = num_sets(decode_bytes(batch, ctx, bits, kh))
    pages, sets_in, seq_lens = decode_inputs(batch, ctx, bits, sets, seed=ctx, k_half=kh)
    fmt = page_format(bits, had, rot_v, k_half=kh)
    width = max(math.ceil(LATENCY_TABLE_TOKENS / BLOCK_SIZE), math.ceil(ctx / BLOCK_SIZE))
    fns = []
    for q, tables in sets_in:
        wide = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
        wide[:, : tables.shape[1]] = tables  # entries past a sequence's length are never read
        out = torch.empty_like(q)
        fns.append(
            lambda q=q, t=wide, o=out: paged_attention_decode(
                q, pages, t, seq_lens, fmt, out=o, scale=HEAD_DIM**-0.5, config=config
            )
        )
    return bench_graphs(fns), bench_stream(fns, evict=True)


def run_latency() -> list[dict]:
    """Small-batch decode: the Triton BF16 kernel (the engine's bf16 path) against the CUDA
    INT4-BDR128 kernel at 1 or 2 groups per warp step and single-CTA span limits, and at 8
    warps per CTA (``w8``)."""
    from sawkv.kernels.launch import KernelConfig

    variants = [("bf16", None, "bf16")]
    for gps in (1, 2):
        for single in (128, 512, 2048):
            cfg = KernelConfig(groups_per_step=gps, single_split_tokens=single)
            variants.append((f"int4-bdr128 u{gps} s{single}", cfg, "int4-bdr128"))
    variants.append(("int4-bdr128 w8", KernelConfig(cta_warps=8), "int4-bdr128"))
    variants.append(("int4-bdr128-kv-kh", None, "int4-bdr128-kv-kh"))
    rows = []
    for batch, ctx in LATENCY_SHAPES:
        for label, cfg, name in variants:
            us, us_stream = time_decode_latency(batch, ctx, name, cfg)
            rows.append(dict(batch=batch, context=ctx, variant=label, us=us, us_stream=us_stream))
            print(f"latency B={batch} L={ctx} {label}: {us:.1f} us, back to back "
                  f"{us_stream:.1f} us", flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    return rows


# ---- copy bandwidth ------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * n / (us * 1e-6) / 1e9


# ---- decode --------------------------------------------------------------------------------------
def decode_inputs(batch: int, ctx: int, bits: int, sets: int, seed: int, k_half: bool = False):
    """``sets`` independent (q, pages, tables) whose pages are disjoint and shuffled."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks = math.ceil(ctx / BLOCK_SIZE)
    nb = batch * blocks
    pages = make_pages(nb * sets, bits, k_half=k_half)
    out = []
    for i in range(sets):
        ids = (torch.randperm(nb, device="cuda", generator=g) + i * nb).int()
        tables = ids.reshape(batch, blocks).contiguous()
        q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        out.append((q, tables))
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return pages, out, seq_lens


def time_decode(batch, ctx, name, config=None, with_err=False):
    """Median µs of one decode call (graph replays over several page sets); with ``with_err``
    ``(us, us_stream, err)``: also the back-to-back time (``bench_stream``) and the relative
    error of the first set against the fp32 torch reference."""
    from sawkv.attention.reference import paged_attention_decode_ref
    from sawkv.kernels import paged_attention_decode

    bits, had, rot_v, kh = fmt_args(name)
    sets = num_sets(decode_bytes(batch, ctx, bits, kh))
    pages, sets_in, seq_lens = decode_inputs(batch, ctx, bits, sets, seed=batch * ctx, k_half=kh)
    fmt = page_format(bits, had, rot_v, k_half=kh)
    flags = dict(scale=HEAD_DIM**-0.5)
    kw = dict(flags, config=config)
    fns = []
    for q, tables in sets_in:
        out = torch.empty_like(q)
        fns.append(
            lambda q=q, t=tables, o=out: paged_attention_decode(
                q, pages, t, seq_lens, fmt, out=o, **kw
            )
        )
    us = bench_graphs(fns)
    if not with_err:
        return us
    us_stream = bench_stream(fns, evict=sets * decode_bytes(batch, ctx, bits, kh) < 4 * L2_BYTES)
    q, tables = sets_in[0]
    out = torch.full_like(q, float("nan"))
    paged_attention_decode(q, pages, tables, seq_lens, fmt, out=out, **kw)
    ref = paged_attention_decode_ref(q, pages, tables, seq_lens, fmt, **flags).float()
    err = float((out.float() - ref).norm() / ref.norm())
    del ref
    torch.cuda.empty_cache()
    return us, us_stream, err


def time_sdpa_decode(batch, ctx) -> tuple[float, float]:
    """(isolated graph µs, back-to-back µs) of torch SDPA over contiguous BF16 K/V."""
    import torch.nn.functional as F

    per_set = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM * 2
    fns = []
    sets = num_sets(per_set)
    for _ in range(sets):
        q = torch.randn(batch, NUM_Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, NUM_KV_HEADS, ctx, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        fns.append(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    return bench_graphs(fns), bench_stream(fns, evict=sets * per_set < 4 * L2_BYTES)


def run_decode(copy_gbs: float, config=None, formats=None) -> list[dict]:
    rows = []
    for batch, ctx in DECODE_SHAPES:
        sdpa_us, sdpa_stream = time_sdpa_decode(batch, ctx)
        sdpa_bytes = decode_bytes(batch, ctx, 16) - batch * math.ceil(ctx / BLOCK_SIZE) * 4
        base = dict(batch=batch, context=ctx, tokens=batch * ctx)
        rows.append(
            dict(
                base,
                method="sdpa-bf16",
                us=sdpa_us,
                bytes=sdpa_bytes,
                gb_s=sdpa_bytes / sdpa_us / 1e3,
                pct_copy=100 * sdpa_bytes / sdpa_us / 1e3 / copy_gbs,
                speedup_vs_sdpa=1.0,
                us_stream=sdpa_stream,
                pct_copy_stream=100 * sdpa_bytes / sdpa_stream / 1e3 / copy_gbs,
            )
        )
        for name in formats or FORMATS:
            us, us_stream, err = time_decode(batch, ctx, name, config, with_err=True)
            nbytes = decode_bytes(batch, ctx, fmt_args(name)[0], fmt_args(name)[3])
            gbs = nbytes / us / 1e3
            rows.append(
                dict(
                    base,
                    method=name,
                    us=us,
                    bytes=nbytes,
                    gb_s=gbs,
                    pct_copy=100 * gbs / copy_gbs,
                    speedup_vs_sdpa=sdpa_us / us,
                    rel_err=err,
                    us_stream=us_stream,
                    pct_copy_stream=100 * nbytes / us_stream / 1e3 / copy_gbs,
                    speedup_vs_sdpa_stream=sdpa_stream / us_stream,
                )
            )
            print(
                f"decode B={batch} L={ctx} {name}: {us:.1f} us {gbs:.0f} GB/s "
                f"({100 * gbs / copy_gbs:.0f}% copy) {sdpa_us / us:.2f}x SDPA err {err:.1e}; "
                f"back to back {us_stream:.1f} us ({100 * nbytes / us_stream / 1e3 / copy_gbs:.0f}%"
                f" copy) {sdpa_stream / us_stream:.2f}x SDPA",
                flush=True,
            )
        torch.cuda.empty_cache()
    return rows


def sweep_decode(copy_gbs: float):
    """Tuning sweep of the decode kernel's knobs on INT4-BDR128; returns (rows, best config).

    The best config minimizes the geometric mean time over the three shapes."""
    from sawkv.kernels.launch import KernelConfig

    shapes = [(1, 32768), (32, 8192), (256, 2048)]
    rows, score = [], {}
    for trans in (False, True):
        for bn, warps in ((64, 4), (128, 4), (128, 8), (256, 8)):
            for stages in (2, 3):
                cfg = KernelConfig(block_n=bn, num_warps=warps, num_stages=stages, trans_qk=trans)
                logs = []
                for batch, ctx in shapes:
                    try:
                        us = time_decode(batch, ctx, "int4-bdr128", cfg)
                    except Exception as e:  # a config that does not compile is just skipped
                        print("sweep skip", cfg, repr(e)[:300], flush=True)
                        break
                    pct = 100 * decode_bytes(batch, ctx, 4) / us / 1e3 / copy_gbs
                    rows.append(dict(batch=batch, ctx=ctx, config=repr(cfg), us=us, pct_copy=pct))
                    logs.append(math.log(us))
                    print(f"sweep B={batch} L={ctx} {cfg}: {us:.1f} us {pct:.0f}%", flush=True)
                if len(logs) == len(shapes):
                    score[cfg] = sum(logs) / len(logs)
    best = min(score, key=score.get)
    print("sweep best", best, flush=True)
    for splits in (16, 32, 64, 128):
        cfg = KernelConfig(**{**best.__dict__, "num_splits": splits})
        us = time_decode(1, 32768, "int4-bdr128", cfg)
        pct = 100 * decode_bytes(1, 32768, 4) / us / 1e3 / copy_gbs
        rows.append(dict(batch=1, ctx=32768, config=repr(cfg), us=us, pct_copy=pct))
        print(f"sweep B=1 splits={splits}: {us:.1f} us {pct:.0f}%", flush=True)
    return rows, best


def sweep_occupancy(copy_gbs: float) -> list[dict]:
    """Register cap / pipeline depth around the default decode config (INT4-BDR128)."""
    from sawkv.kernels.launch import DECODE_CONFIG, KernelConfig

    rows = []
    variants = [
        dict(),
        dict(maxnreg=128),
        dict(maxnreg=128, num_stages=2),
        dict(num_stages=4),
        dict(maxnreg=255),
        dict(block_n=64, maxnreg=128),
        dict(block_n=64, maxnreg=128, num_stages=4),
        dict(block_n=256, num_warps=8, maxnreg=128),
    ]
    for v in variants:
        cfg = KernelConfig(**{**DECODE_CONFIG.__dict__, **v})
        for batch, ctx in [(1, 32768), (32, 8192), (256, 2048)]:
            try:
                us = time_decode(batch, ctx, "int4-bdr128", cfg)
            except Exception as e:
                print("occupancy skip", cfg, repr(e)[:300], flush=True)
                break
            pct = 100 * decode_bytes(batch, ctx, 4) / us / 1e3 / copy_gbs
            rows.append(dict(batch=batch, ctx=ctx, config=repr(cfg), us=us, pct_copy=pct))
            print(f"occupancy B={batch} L={ctx} {v}: {us:.1f} us {pct:.0f}%", flush=True)
    return rows


def sweep_extend():
    """Extend tile sweep at 2048 new tokens over 8K cached, INT4-BDR128."""
    from sawkv.kernels.launch import KernelConfig

    rows = []
    for br, bn, warps in ((64, 32, 4), (64, 64, 4), (128, 32, 8), (128, 64, 8), (128, 64, 4)):
        cfg = KernelConfig(block_n=bn, block_r=br, num_warps=warps, num_stages=2)
        try:
            us = time_extend(8192, "int4-bdr128", cfg)
        except Exception as e:
            print("extend sweep skip", cfg, repr(e)[:300], flush=True)
            continue
        rows.append(dict(config=repr(cfg), us=us, cfg=cfg))
        print(f"extend sweep {cfg}: {us:.0f} us", flush=True)
    best = min(rows, key=lambda r: r["us"])["cfg"]
    return [{k: v for k, v in r.items() if k != "cfg"} for r in rows], best


# ---- write ---------------------------------------------------------------------------------------
WRITE_FORMATS = {
    "int4": (4, 0, False, False),
    "int4-bdr128": (4, 128, False, False),
    "int4-bdr128-kc": (4, 128, False, True),
    "int4-bdr128-kv-kc": (4, 128, True, True),
    "int8": (8, 0, False, False),
    "bf16": (16, 0, False, False),
}


def run_write() -> list[dict]:
    from sawkv.kernels import cache_write

    rows = []
    for n in (1, 64, 8192, 65536):
        nb = max(64, 4 * math.ceil(n / BLOCK_SIZE))
        k = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        # decode-sized writes scatter one token per sequence; prefill-sized ones fill shuffled
        # pages in position order (whole 16-token groups: the kernel's group path)
        layout = "scatter" if n <= 64 else "prefill"
        if layout == "scatter":
            slots = torch.randperm(nb * BLOCK_SIZE, device="cuda")[:n].int()
        else:
            pos = torch.arange(n, device="cuda")
            pages_of = torch.randperm(nb, device="cuda")[: math.ceil(n / BLOCK_SIZE)]
            slots = (pages_of[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE).int()
        # baseline: BF16 scatter into the same [nb, H, bs, d] pages with a precomputed row index
        kc = torch.empty(
            nb * NUM_KV_HEADS * BLOCK_SIZE, HEAD_DIM, device="cuda", dtype=torch.bfloat16
        )
        vc = torch.empty_like(kc)
        blk, off = slots.long() // BLOCK_SIZE, slots.long() % BLOCK_SIZE
        heads = torch.arange(NUM_KV_HEADS, device="cuda")
        rows_idx = ((blk[:, None] * NUM_KV_HEADS + heads) * BLOCK_SIZE + off[:, None]).reshape(-1)
        kf, vf = k.reshape(-1, HEAD_DIM), v.reshape(-1, HEAD_DIM)

        def scatter(kc=kc, vc=vc, rows_idx=rows_idx, kf=kf, vf=vf):
            kc.index_copy_(0, rows_idx, kf)
            vc.index_copy_(0, rows_idx, vf)

        base_us = bench_graphs([scatter])
        base_bytes = 2 * 2 * kf.numel() * 2 + rows_idx.numel() * 8
        rows.append(
            dict(
                num_tokens=n,
                layout=layout,
                method="bf16-index_copy",
                us=base_us,
                bytes=base_bytes,
                gb_s=base_bytes / base_us / 1e3,
                ratio_vs_bf16_scatter=1.0,
            )
        )
        k_mean = k.float().mean(0)
        formats = dict(WRITE_FORMATS)
        # the per-token path on the same slots: for prefill a comparison; for decode the path
        # the engine takes (group_path=False), also at 1 and 2 warps (fewer warps, fewer
        # cross-warp barriers in a write that is one latency chain)
        formats["int4-bdr128-token-path"] = (4, 128, False, False)
        if layout == "scatter":
            formats["int4-bdr128-token-path-w2"] = (4, 128, False, False)
            formats["int4-bdr128-token-path-w1"] = (4, 128, False, False)
        # both rotations of 16-bit rows (cache_write.DEFAULT_ROTATION_16 picks the default)
        formats["int4-bdr128-kv-kc-tf32x3"] = (4, 128, True, True)
        formats["int4-bdr128-kv-kc-exact16"] = (4, 128, True, True)
        formats["int4-bdr128-exact16"] = (4, 128, False, False)
        for name, (bits, had, rot_v, mean) in formats.items():
            pages = make_pages(nb, bits)
            fmt = page_format(bits, had, rot_v)
            km = k_mean if mean else None
            groups = "token-path" not in name
            rot = name.rsplit("-", 1)[-1] if name.endswith(("tf32x3", "exact16")) else None
            warps = int(name[-1]) if name.endswith(("-w1", "-w2")) else None

            def fn(k=k, v=v, pages=pages, slots=slots, km=km, fmt=fmt, groups=groups, rot=rot,
                   warps=warps):  # fmt: skip
                cache_write(k, v, pages, slots, fmt, km, group_path=groups, rotation=rot,
                            num_warps=warps)  # fmt: skip

            us = bench_graphs([fn])
            per_vec = HEAD_DIM * 2 if bits == 16 else HEAD_DIM * bits // 8 + 4
            nbytes = 2 * kf.numel() * 2 + 2 * n * NUM_KV_HEADS * per_vec + n * 4
            rows.append(
                dict(
                    num_tokens=n,
                    layout=layout,
                    method=name,
                    us=us,
                    bytes=nbytes,
                    gb_s=nbytes / us / 1e3,
                    ratio_vs_bf16_scatter=us / base_us,
                )
            )
            print(
                f"write n={n} {name}: {us:.1f} us ({us / base_us:.2f}x index_copy {base_us:.1f})",
                flush=True,
            )
    return rows


def sweep_write() -> list[dict]:
    """Write-kernel launch knobs at 8192 tokens for the heaviest format (K+V rotated, centered)."""
    from sawkv.kernels import cache_write

    n, nb = 8192, 4 * 8192 // BLOCK_SIZE
    k = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(nb * BLOCK_SIZE, device="cuda")[:n].int()
    k_mean = k.float().mean(0)
    pages = make_pages(nb, 4)
    rows = []
    for name, had, rot_v in (("int4-bdr128-kv-kc", 128, True), ("int4-bdr128-kc", 128, False)):
        for bt, warps in ((16, 4), (16, 8), (32, 4), (32, 8), (64, 8)):

            def fn(bt=bt, warps=warps, had=had, rot_v=rot_v):
                cache_write(k, v, pages, slots, page_format(4, had, rot_v), k_mean, block_t=bt,
                            num_warps=warps)  # fmt: skip

            us = bench_graphs([fn])
            rows.append(dict(format=name, block_t=bt, num_warps=warps, us=us))
            print(f"write sweep {name} block_t={bt} warps={warps}: {us:.1f} us", flush=True)
    return rows


# ---- extend --------------------------------------------------------------------------------------
EXTEND_CHUNK = 2048


def extend_flops(ctx: int) -> float:
    return 4 * NUM_Q_HEADS * HEAD_DIM * EXTEND_CHUNK * (ctx + (EXTEND_CHUNK + 1) / 2)


def time_extend(ctx: int, name: str, config=None) -> float:
    """One sequence: EXTEND_CHUNK new tokens over ``ctx`` cached ones (all in shuffled pages)."""
    from sawkv.kernels import paged_attention_extend

    seq = ctx + EXTEND_CHUNK
    blocks = math.ceil(seq / BLOCK_SIZE)
    bits, had, rot_v, kh = fmt_args(name)
    q = torch.randn(EXTEND_CHUNK, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(blocks, device="cuda").int()[None]
    seq_lens = torch.tensor([seq], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, EXTEND_CHUNK], dtype=torch.int32, device="cuda")
    pages = make_pages(blocks, bits, k_half=kh)
    fmt = page_format(bits, had, rot_v, k_half=kh)
    out = torch.empty_like(q)
    kw = dict(scale=HEAD_DIM**-0.5, config=config)

    host = dict(seq_lens_host=[seq], query_start_host=[0, EXTEND_CHUNK])

    def fn():
        paged_attention_extend(
            q,
            pages,
            tables,
            seq_lens,
            qsl,
            fmt,
            out=out,
            max_query_len=EXTEND_CHUNK,
            **host,
            **kw,
        )

    # the SDPA path loops over sequences on the host (not graph-capturable); a chunk takes
    # milliseconds, so plain launches cost nothing measurable
    return bench(fn)


def time_sdpa_extend(ctx: int) -> float:
    """SDPA on contiguous (dequantized) BF16 K/V with the bottom-right causal mask."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    seq = ctx + EXTEND_CHUNK
    q = torch.randn(1, NUM_Q_HEADS, EXTEND_CHUNK, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, NUM_KV_HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = causal_lower_right(EXTEND_CHUNK, seq)
    return bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))


def run_extend(config=None) -> list[dict]:
    rows = []
    for ctx in (8192, 16384, 32768):
        flops = extend_flops(ctx)
        sdpa_us = time_sdpa_extend(ctx)
        base = dict(context=ctx, chunk=EXTEND_CHUNK)
        rows.append(dict(base, method="sdpa-bf16", us=sdpa_us, tflops=flops / sdpa_us / 1e6,
                         ratio_vs_sdpa=1.0))  # fmt: skip
        for name in ("int4", "int4-bdr128", "int4-bdr128-kv", "int8", "bf16"):
            us = time_extend(ctx, name, config)
            rows.append(dict(base, method=name, us=us, tflops=flops / us / 1e6,
                             ratio_vs_sdpa=sdpa_us / us))  # fmt: skip
            print(
                f"extend ctx={ctx} {name}: {us:.0f} us {flops / us / 1e6:.0f} TFLOP/s "
                f"({sdpa_us / us:.2f}x SDPA {sdpa_us:.0f} us)",
                flush=True,
            )
    return rows


# ---- report --------------------------------------------------------------------------------------
def plot(result: dict, path: str) -> None:
    """GB/s (all bytes read) per decode shape, ordered by batch x context, one line a format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["decode"]
    shapes = sorted({(r["tokens"], r["batch"], r["context"]) for r in rows})
    xs = {s: i for i, s in enumerate(shapes)}
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name in ["sdpa-bf16", *FORMATS]:
        pts = sorted((xs[(r["tokens"], r["batch"], r["context"])], r["gb_s"]) for r in rows
                     if r["method"] == name)  # fmt: skip
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    copy = result["copy_gb_s"]
    ax.axhline(copy, color="k", ls="--", lw=1, label=f"copy {copy:.0f} GB/s")
    ax.axhline(0.85 * copy, color="gray", ls=":", lw=1, label="85% of copy (target)")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"B={b}\nL={c // 1024}K\n({t // 1024}K tok)" for t, b, c in shapes])
    ax.set_ylabel("achieved GB/s (codes + metadata + tables + q/out)")
    ax.set_ylim(0, copy * 1.08)
    ax.set_title(f"Paged decode, 32q/8kv heads, d=128, page 16 ({result['device']})")
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(result: dict) -> str:
    lines = [
        f"copy bandwidth {result['copy_gb_s']:.0f} GB/s on {result['device']}",
        f"{'B':>4} {'L':>6} {'method':>15} {'us':>8} {'GB/s':>6} {'%copy':>6} {'xSDPA':>6} err"
        "      | back to back: us  %copy xSDPA",
    ]
    for r in result.get("decode", []):
        stream = ""
        if "us_stream" in r:
            stream = (f" | {r['us_stream']:>8.1f} {r['pct_copy_stream']:>6.1f} "
                      f"{r.get('speedup_vs_sdpa_stream', 1.0):>5.2f}")  # fmt: skip
        lines.append(
            f"{r['batch']:>4} {r['context']:>6} {r['method']:>15} {r['us']:>8.1f} "
            f"{r['gb_s']:>6.0f} {r['pct_copy']:>6.1f} {r['speedup_vs_sdpa']:>6.2f} "
            f"{r.get('rel_err', 0):.1e}{stream}"
        )
    by = {(r["batch"], r["context"], r["method"]): r["us"] for r in result.get("decode", [])}
    for b, l in DECODE_SHAPES:
        if (b, l, "int4") in by and (b, l, "int4-bdr128") in by:
            lines.append(
                f"BDR overhead B={b} L={l}: "
                f"{100 * (by[(b, l, 'int4-bdr128')] / by[(b, l, 'int4')] - 1):+.1f}%"
            )
        if (b, l, "int4-bdr128-kv") in by and (b, l, "int4-bdr128-kv-kh") in by:
            kh_pct = 100 * (by[(b, l, "int4-bdr128-kv-kh")] / by[(b, l, "int4-bdr128-kv")] - 1)
            lines.append(f"-kh overhead B={b} L={l}: {kh_pct:+.1f}%")
    for r in result.get("write", []):
        lines.append(
            f"write n={r['num_tokens']:>5} {r['method']:>18} {r['us']:>8.1f} us "
            f"{r['gb_s']:>6.0f} GB/s {r['ratio_vs_bf16_scatter']:.2f}x index_copy"
        )
    for r in result.get("extend", []):
        lines.append(
            f"extend ctx={r['context']:>6} {r['method']:>15} {r['us']:>8.0f} us "
            f"{r['tflops']:>5.0f} TFLOP/s {r['ratio_vs_sdpa']:.2f}x SDPA"
        )
    for r in result.get("prefill", []):
        lines.append(f"prefill {r}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--sweep", action="store_true", help="also run the decode/extend sweeps")
    ap.add_argument("--sweep-write", action="store_true", help="also run the write sweep")
    ap.add_argument("--sweep-occupancy", action="store_true", help="register-cap sweep only")
    ap.add_argument("--only", default="check,long,decode,write,extend")
    ap.add_argument("--cuda-sweep", action="store_true", help="CUDA decode knob sweep")
    ap.add_argument("--cta-warps", type=int, default=0,
                    help="decode: warps per CTA of the CUDA kernel (4, or 8 at d=128)")  # fmt: skip
    ap.add_argument("--name", default=None, help="results file stem (default kernels_<gpu>)")
    ap.add_argument("--plot", help="only plot an existing results JSON (next to it)")
    args = ap.parse_args()
    if args.plot:
        result = json.load(open(args.plot))
        plot(result, os.path.splitext(args.plot)[0] + ".png")
        print(table(result))
        return
    os.makedirs(args.out, exist_ok=True)
    parts = args.only.split(",")
    t0 = time.time()
    result = dict(
        device=torch.cuda.get_device_name(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=git_commit(),
        sources=source_digest(),
        torch=torch.__version__,
        l2_flush=FLUSH,
        shape=dict(
            num_q_heads=NUM_Q_HEADS,
            num_kv_heads=NUM_KV_HEADS,
            head_dim=HEAD_DIM,
            block_size=BLOCK_SIZE,
        ),
    )
    import triton

    result["triton"] = triton.__version__
    gpu = "h200" if "H200" in result["device"] else "h100" if "H100" in result["device"] else "gpu"
    stem = args.name or f"kernels_{gpu}"
    path = os.path.join(args.out, f"{stem}.json")

    def save():  # after every part, so a run cut short still leaves its numbers
        result["wall_s"] = time.time() - t0
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    if "check" in parts:
        t = time.time()
        from sawkv.kernels import decode_cuda

        ok = decode_cuda.available()
        result["cuda_decode"] = dict(
            available=ok, error=decode_cuda.build_error(), build_s=time.time() - t
        )
        print("cuda decode", result["cuda_decode"], flush=True)
        result["correctness"] = check_correctness()
        save()
    if "long" in parts:
        result["long_context"] = check_long_context()
        save()
    result["copy_gb_s"] = copy_bandwidth()
    print(f"copy bandwidth {result['copy_gb_s']:.0f} GB/s", flush=True)
    if args.cuda_sweep:
        result["cuda_sweep"] = sweep_cuda_decode(result["copy_gb_s"])
        save()
    decode_cfg = extend_cfg = None
    if args.cta_warps:
        import dataclasses

        from sawkv.kernels.launch import DECODE_CONFIG

        decode_cfg = dataclasses.replace(DECODE_CONFIG, cta_warps=args.cta_warps)
        result["decode_config"] = repr(decode_cfg)
    if args.sweep_occupancy:
        result["occupancy_sweep"] = sweep_occupancy(result["copy_gb_s"])
        save()
    if args.sweep:
        result["sweep"], decode_cfg = sweep_decode(result["copy_gb_s"])
        result["decode_config"] = repr(decode_cfg)
        save()
        result["extend_sweep"], extend_cfg = sweep_extend()
        result["extend_config"] = repr(extend_cfg)
        save()
    if "decode" in parts:
        result["decode"] = run_decode(result["copy_gb_s"], decode_cfg)
        save()
    if "latency" in parts:
        result["latency"] = run_latency()
        save()
    if "write" in parts:
        if args.sweep_write:
            result["write_sweep"] = sweep_write()
        result["write"] = run_write()
        save()
    if "extend" in parts:
        result["extend"] = run_extend(extend_cfg)
        save()
    if "decode" in parts:
        try:
            plot(result, os.path.join(args.out, f"{stem}.png"))
        except ImportError:
            print("matplotlib missing: plot later with --plot", file=sys.stderr)
    print(table(result))


if __name__ == "__main__":
    main()
