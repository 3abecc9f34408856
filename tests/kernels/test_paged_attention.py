"""Triton paged attention (split-K decode, extend) against the torch reference, same pages.

Tolerances: with fp32 inputs the kernel keeps fp32 products, so only summation order differs
(1e-4 on O(1) outputs). With fp16 inputs the query is rounded to fp16 for the tensor-core
products, the value weights p * scale_v too, and the output is stored in fp16: each is a
relative error of ~5e-4, so outputs of magnitude ~1 agree to ~3e-3 (2e-2 allowed, still far
below any real bug, which shows up as O(1) differences).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from paged_setup import paged_case

from sawkv.attention.reference import paged_attention_decode_ref, paged_attention_extend_ref
from sawkv.kernels import PageFormat, paged_attention_decode, paged_attention_extend, plan_decode
from sawkv.kernels.launch import KernelConfig
from sawkv.kernels.plan import pick_num_splits


def _tol(dtype):
    return dict(rtol=0, atol=1e-4) if dtype == torch.float32 else dict(rtol=0, atol=2e-2)


# Every head_dim, GQA ratio, block size, had_block (0, 16 .. head_dim), bits and dtype appears;
# lengths are mixed and mostly not multiples of the block size; splits 0 = automatic.
# (head_dim, kv_heads, ratio, block_size, bits, had, rot_v, lens, window, splits, block_n, dtype)
DECODE_CASES = [
    (64, 2, 1, 16, 4, 0, False, [37, 5, 70], 0, 1, 32, torch.float32),
    (64, 1, 2, 32, 8, 16, True, [100, 33], 0, 3, 16, torch.float16),
    (64, 2, 4, 64, 16, 64, False, [65, 1], 0, 1, 64, torch.float32),
    (128, 1, 8, 16, 4, 128, True, [150, 17], 40, 4, 32, torch.float32),
    (128, 2, 16, 32, 4, 32, False, [63, 64], 0, 2, 32, torch.float16),
    (128, 1, 4, 64, 8, 0, False, [130], 10, 0, 32, torch.float32),
    (256, 1, 2, 16, 4, 256, True, [40, 18], 0, 2, 16, torch.float32),
    (256, 1, 16, 32, 16, 0, False, [50], 0, 1, 32, torch.float16),
    (256, 2, 1, 64, 8, 128, False, [70, 3], 0, 0, 16, torch.float32),
    (128, 2, 4, 16, 4, 16, False, [1, 200], 0, 0, 64, torch.float16),
]
# Keys with one (scale, min) per half (k_half_meta, the last field): INT4 and INT8, d=64 and
# d=128, rotated or not, single and split-K (with the reduce kernel's output rotation).
KH_DECODE_CASES = [
    (64, 2, 4, 16, 4, 64, True, [37, 70], 0, 3, 16, torch.float32, True),
    (64, 1, 2, 32, 8, 0, False, [100, 5], 0, 1, 32, torch.float16, True),
    (128, 2, 8, 16, 4, 0, False, [150, 17], 40, 2, 32, torch.float16, True),
    (128, 1, 4, 16, 8, 32, False, [63], 0, 0, 64, torch.float32, True),
]


@pytest.mark.parametrize(
    "d, h, ratio, bs, bits, had, rot_v, lens, window, splits, block_n, dtype, k_half",
    [(*c, False) for c in DECODE_CASES] + KH_DECODE_CASES,
)
def test_decode_matches_reference(d, h, ratio, bs, bits, had, rot_v, lens, window, splits,
                                  block_n, dtype, k_half):  # fmt: skip
    pages, tables, seq_lens, fmt = paged_case(
        lens, head_dim=d, num_kv_heads=h, block_size=bs, bits=bits, had_block=had,
        rotate_v=rot_v, dtype=dtype, k_half=k_half,
    )  # fmt: skip
    q = torch.randn(len(lens), h * ratio, d).to(dtype)
    kw = dict(scale=d**-0.5, sliding_window=window)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    cfg = KernelConfig(block_n=block_n, num_splits=splits)
    paged_attention_decode(q, pages, tables, seq_lens, fmt, out=out, config=cfg, **kw)
    ref = paged_attention_decode_ref(q, pages, tables, seq_lens, fmt, **kw)
    torch.testing.assert_close(out.float(), ref.float(), **_tol(dtype))


# (head_dim, kv_heads, ratio, block_size, bits, had, rot_v, lens, q_lens, window, block_r, dtype)
EXTEND_CASES = [
    (64, 2, 1, 16, 4, 0, False, [37, 5, 70], [10, 5, 1], 0, 16, torch.float32),
    (64, 1, 4, 32, 8, 32, True, [40, 90], [40, 17], 0, 32, torch.float16),
    (128, 1, 8, 64, 16, 128, False, [100], [33], 20, 64, torch.float32),
    (128, 2, 16, 16, 4, 64, True, [30, 47], [3, 47], 0, 32, torch.float32),
    (256, 1, 2, 32, 4, 256, False, [50, 20], [25, 20], 7, 16, torch.float16),
    (128, 1, 2, 16, 8, 16, False, [65], [64], 0, 64, torch.float32),
]
# ... and with k_half_meta keys (the last field)
EXTEND_CASES = [(*c, False) for c in EXTEND_CASES] + [
    (64, 2, 2, 16, 4, 64, True, [37, 70], [10, 70], 0, 32, torch.float32, True),
    (128, 1, 4, 32, 8, 0, False, [40, 90], [40, 17], 9, 32, torch.float16, True),
]


@pytest.mark.parametrize(
    "d, h, ratio, bs, bits, had, rot_v, lens, q_lens, window, block_r, dtype, k_half",
    EXTEND_CASES,
)
def test_extend_matches_reference(d, h, ratio, bs, bits, had, rot_v, lens, q_lens, window,
                                  block_r, dtype, k_half):  # fmt: skip
    pages, tables, seq_lens, fmt = paged_case(
        lens, head_dim=d, num_kv_heads=h, block_size=bs, bits=bits, had_block=had,
        rotate_v=rot_v, dtype=dtype, k_half=k_half,
    )  # fmt: skip
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), h * ratio, d).to(dtype)
    kw = dict(scale=d**-0.5, sliding_window=window)
    out = torch.full_like(q, float("nan"))
    cfg = KernelConfig(block_n=32, block_r=block_r)
    paged_attention_extend(q, pages, tables, seq_lens, qsl, fmt, out=out, config=cfg, **kw)
    ref = paged_attention_extend_ref(q, pages, tables, seq_lens, qsl, fmt, **kw)
    torch.testing.assert_close(out.float(), ref.float(), **_tol(dtype))


@pytest.mark.parametrize(
    "d, h, ratio, bs, bits, had, rot_v, lens, q_lens, window, block_r, dtype, k_half",
    EXTEND_CASES,
)
def test_extend_via_dequant_and_sdpa_matches_reference(
    d, h, ratio, bs, bits, had, rot_v, lens, q_lens, window, block_r, dtype, k_half
):
    # the prefill path on CUDA: pages dequantized once by a Triton kernel, then SDPA
    pages, tables, seq_lens, fmt = paged_case(
        lens, head_dim=d, num_kv_heads=h, block_size=bs, bits=bits, had_block=had,
        rotate_v=rot_v, dtype=dtype, seed=3, k_half=k_half,
    )  # fmt: skip
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), h * ratio, d).to(dtype)
    out = torch.full_like(q, float("nan"))
    kw = dict(scale=d**-0.5, sliding_window=window)
    paged_attention_extend(q, pages, tables, seq_lens, qsl, fmt, out=out, impl="sdpa", **kw)
    ref = paged_attention_extend_ref(q, pages, tables, seq_lens, qsl, fmt, **kw)
    torch.testing.assert_close(out.float(), ref.float(), **_tol(dtype))


@pytest.mark.parametrize("bits, had, rot_v", [(4, 64, True), (4, 0, False), (8, 32, False)])
def test_sdpa_extend_bf16_model(bits, had, rot_v):
    """A bf16 model on quantized pages: the SDPA path works in fp16 (q rotated in fp32 and
    rounded once to fp16, output rotated back straight into bf16); relative error against the
    fp32 reference within the 5e-3 goal plus bf16 output rounding."""
    pages, tables, seq_lens, fmt = paged_case(
        [70, 33], head_dim=64, num_kv_heads=2, block_size=16, bits=bits, had_block=had,
        rotate_v=rot_v, dtype=torch.bfloat16, seed=5,
    )  # fmt: skip
    qsl = torch.tensor([0, 20, 53], dtype=torch.int32)
    q = (3 * torch.randn(53, 4, 64)).bfloat16()
    out = torch.full_like(q, float("nan"))
    paged_attention_extend(q, pages, tables, seq_lens, qsl, fmt, out=out, impl="sdpa", scale=0.125)
    ref = paged_attention_extend_ref(q, pages, tables, seq_lens, qsl, fmt, scale=0.125).float()
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 8e-3, err


@pytest.mark.parametrize("k_half", [False, True])
def test_decode_trans_qk_matches_reference(k_half):
    """Scores as ``K q^T`` (``trans_qk``), both ways of scaling keys (per row, per half)."""
    pages, tables, seq_lens, fmt = paged_case(
        [70, 9], head_dim=64, num_kv_heads=1, block_size=16, bits=4, had_block=32,
        rotate_v=False, k_half=k_half,
    )  # fmt: skip
    q = torch.randn(2, 4, 64)
    cfg = KernelConfig(block_n=32, num_splits=2, trans_qk=True)
    out = paged_attention_decode(q, pages, tables, seq_lens, fmt, scale=0.125, config=cfg)
    ref = paged_attention_decode_ref(q, pages, tables, seq_lens, fmt, scale=0.125)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_cuda_decode_dispatch_covers_k_half_meta_and_names_what_it_lacks(monkeypatch):
    """Where the CUDA decode kernel builds, plans for INT4/INT8 pages take it with or without
    per-half key metadata; what it does not serve (16-bit pages, fp32 q, head_dim 96, G > 16)
    goes to Triton under "auto" and is a clear error under "cuda". The GPU is faked: only the
    dispatch decision runs (tests/engine/test_gpu.py runs the kernels for real)."""
    from types import SimpleNamespace

    from sawkv.kernels import decode_cuda
    from sawkv.kernels import plan as plan_mod

    monkeypatch.setattr(plan_mod, "_interpreting", lambda: False)
    monkeypatch.setattr(decode_cuda, "available", lambda device=None: True)

    def query(dtype=torch.bfloat16, d=128, hq=8):
        return SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(3, hq, d))

    fmt = PageFormat(bits=4, head_dim=128, num_kv_heads=2, block_size=16, had_block=128)
    kh = replace(fmt, k_half_meta=True)
    for f in (fmt, kh, replace(kh, bits=8), replace(fmt, bits=8)):
        assert plan_mod._use_cuda(query(), f, 8, "auto") and plan_mod._use_cuda(
            query(), f, 8, "cuda"
        )
    unserved = [
        (query(), replace(fmt, bits=16, had_block=0, dtype=torch.bfloat16), 8),
        (query(torch.float32), kh, 8),
        (query(d=96), replace(kh, head_dim=96, had_block=32), 8),
        (query(hq=64), kh, 64),
    ]
    for q, f, hq in unserved:
        assert not plan_mod._use_cuda(q, f, hq, "auto")
        with pytest.raises(ValueError, match="CUDA decode kernel serves"):
            plan_mod._use_cuda(q, f, hq, "cuda")


def test_decode_split_count_does_not_change_result():
    pages, tables, seq_lens, fmt = paged_case(
        [120, 7], head_dim=64, num_kv_heads=1, block_size=16, bits=4, had_block=32, rotate_v=True
    )
    q = torch.randn(2, 4, 64)
    cfgs = [KernelConfig(block_n=16, num_splits=s) for s in (1, 5)]
    outs = [
        paged_attention_decode(q, pages, tables, seq_lens, fmt, scale=0.125, config=c) for c in cfgs
    ]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)


def test_launcher_validation():
    pages, tables, seq_lens, fmt = paged_case(
        [20], head_dim=64, num_kv_heads=2, block_size=16, bits=4, had_block=0, rotate_v=False
    )
    q = torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention_decode(q[:, :3], pages, tables, seq_lens, fmt, scale=0.1)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_decode(q, pages, tables.long(), seq_lens, fmt, scale=0.1)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_attention_decode(q, pages, tables, seq_lens.long(), fmt, scale=0.1)
    with pytest.raises(ValueError, match="sequences"):
        paged_attention_decode(q.expand(2, 4, 64), pages, tables, seq_lens, fmt, scale=0.1)
    with pytest.raises(ValueError, match="out"):
        paged_attention_decode(
            q, pages, tables, seq_lens, fmt, scale=0.1, out=torch.empty(1, 4, 32)
        )
    with pytest.raises(ValueError, match="rotate_v"):
        replace(fmt, rotate_v=True)
    with pytest.raises(ValueError, match="block_n"):
        cfg = KernelConfig(block_n=24)
        paged_attention_decode(q, pages, tables, seq_lens, fmt, scale=0.1, config=cfg)
    with pytest.raises(ValueError, match="query_start_loc"):
        qsl = torch.tensor([0, 1, 1], dtype=torch.int32)
        paged_attention_extend(q, pages, tables, seq_lens, qsl, fmt, scale=0.1)
    with pytest.raises(ValueError, match="k_cache"):  # pages of another format
        paged_attention_decode(q, pages, tables, seq_lens, replace(fmt, bits=8), scale=0.1)
    with pytest.raises(ValueError, match="float pages"):
        fp16 = replace(fmt, bits=16, dtype=torch.float16)
        paged_attention_decode(q, fp16.empty_pages(3), tables, seq_lens, fp16, scale=0.1)
    # warps per CTA of the CUDA kernel: 4 or 8, and 8 only where it is compiled (checked in the
    # plan, on any device, before anything launches)
    with pytest.raises(ValueError, match="cta_warps must be 0"):
        plan_decode(q, tables, seq_lens, fmt, config=KernelConfig(cta_warps=6))
    with pytest.raises(ValueError, match="head_dim 128 with groups_per_step"):
        plan_decode(q, tables, seq_lens, fmt, config=KernelConfig(cta_warps=8))  # d=64


def test_planned_launch_matches_unplanned_and_rejects_other_shapes():
    """A plan made once serves several layers (pages) of its format; a plan for another step
    shape or format is refused instead of launching over the wrong workspace."""
    pages, tables, seq_lens, fmt = paged_case(
        [50, 9], head_dim=64, num_kv_heads=1, block_size=16, bits=4, had_block=32, rotate_v=True
    )
    # another layer's pages under the same block tables: the same bytes read the other way round
    other = type(pages)(pages.v_cache, pages.k_cache, pages.v_meta, pages.k_meta)
    q = torch.randn(2, 4, 64)
    cfg = KernelConfig(block_n=16, num_splits=2)
    plan = plan_decode(q, tables, seq_lens, fmt, config=cfg)
    assert plan.num_splits == 2 and plan.part_o.shape == (2, 4, 2, 64)
    for layer in (pages, other):
        got = paged_attention_decode(q, layer, tables, seq_lens, fmt, scale=0.125, plan=plan)
        want = paged_attention_decode_ref(q, layer, tables, seq_lens, fmt, scale=0.125)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="plan"):
        paged_attention_decode(q[:1], pages, tables[:1], seq_lens[:1], fmt, scale=0.1, plan=plan)
    with pytest.raises(ValueError, match="plan"):
        paged_attention_decode(q, pages, tables, seq_lens, replace(fmt, had_block=0,
                               rotate_v=False), scale=0.1, plan=plan)  # fmt: skip


@pytest.mark.parametrize(
    "num_seqs, width, sms, want",
    [(1, 64, 132, 16), (64, 64, 132, 2), (256, 64, 132, 1), (1, 2, 132, 1)],
)
def test_triton_split_count(num_seqs, width, sms, want):
    """~2 waves of programs, >= 4 tiles per split, a power of two (from the block-table width)."""
    fmt = PageFormat(bits=4, head_dim=128, num_kv_heads=2, block_size=16)
    cfg = KernelConfig(block_n=16)
    assert pick_num_splits("triton", cfg, num_seqs, fmt, width * 16, sms) == want


@pytest.mark.parametrize(
    "num_seqs, tokens, want",
    [(1, 32768, 32), (8, 32768, 4), (32, 8192, 1), (256, 2048, 1), (1, 256, 2), (1, 100, 1)],
)
def test_cuda_split_count(num_seqs, tokens, want):
    """The CUDA kernel's splits fill whole waves of ~2 CTAs per SM (132 SMs, 8 KV heads), each
    split >= 128 tokens: the counts a forced-split sweep on an H100 found fastest at the first
    four shapes (kernels_latency_h100.json); a configured count wins."""
    fmt = PageFormat(bits=4, head_dim=128, num_kv_heads=8, block_size=16)
    assert pick_num_splits("cuda", KernelConfig(), num_seqs, fmt, tokens, 132) == want
    assert pick_num_splits("cuda", KernelConfig(num_splits=5), num_seqs, fmt, tokens, 132) == 5


def test_env_cta_warps_applies_only_where_the_cuda_kernel_has_the_variant(monkeypatch):
    from sawkv.kernels.plan import CTA_WARPS_ENV, _with_env_cta_warps

    fmt128 = PageFormat(bits=4, head_dim=128, num_kv_heads=2, block_size=16, had_block=128)
    fmt64 = PageFormat(bits=4, head_dim=64, num_kv_heads=2, block_size=16, had_block=64)
    base = KernelConfig()
    monkeypatch.delenv(CTA_WARPS_ENV, raising=False)
    assert _with_env_cta_warps(base, fmt128) is base
    monkeypatch.setenv(CTA_WARPS_ENV, "8")
    assert _with_env_cta_warps(base, fmt128).cta_warps == 8
    # no 8-warp variant at d=64 or two groups per warp step: the default stays
    assert _with_env_cta_warps(base, fmt64).cta_warps == 0
    two = KernelConfig(groups_per_step=2)
    assert _with_env_cta_warps(two, fmt128).cta_warps == 0
    # an explicit config wins over the environment
    assert _with_env_cta_warps(KernelConfig(cta_warps=4), fmt128).cta_warps == 4
    monkeypatch.setenv(CTA_WARPS_ENV, "6")
    with pytest.raises(ValueError, match=CTA_WARPS_ENV):
        _with_env_cta_warps(base, fmt128)


def test_sdpa_plan_holds_the_query_workspace_and_refuses_another_query_shape():
    """The SDPA extend path rotates the queries into a workspace planned once per step (no
    per-layer allocation); a query of another head count under that plan is refused."""
    from sawkv.kernels import plan_extend

    pages, tables, seq_lens, fmt = paged_case(
        [40, 17], head_dim=64, num_kv_heads=2, block_size=16, bits=4, had_block=64, rotate_v=False
    )
    qsl = torch.tensor([0, 8, 13], dtype=torch.int32)
    q = torch.randn(13, 4, 64).bfloat16()
    plan = plan_extend(q, tables, seq_lens, qsl, fmt, impl="sdpa")
    assert plan.sdpa.qbuf.shape == q.shape and plan.sdpa.qbuf.dtype == torch.float16
    got = paged_attention_extend(q, pages, tables, seq_lens, qsl, fmt, scale=0.125, plan=plan)
    want = paged_attention_extend(q, pages, tables, seq_lens, qsl, fmt, scale=0.125, impl="sdpa")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="SDPA plan"):
        paged_attention_extend(torch.randn(13, 2, 64).bfloat16(), pages, tables, seq_lens, qsl,
                               fmt, scale=0.125, plan=plan)  # fmt: skip
    # bf16 pages with a bf16 query: q is used as it is, no workspace
    *_, bf16 = paged_case([40, 17], head_dim=64, num_kv_heads=2, block_size=16,
                          bits=16, had_block=0, rotate_v=False,
                          dtype=torch.bfloat16)  # fmt: skip
    assert plan_extend(q, tables, seq_lens, qsl, bf16, impl="sdpa").sdpa.qbuf is None
