"""Attention sinks: exact K/V of each sequence's first positions read instead of the pages'.

The oracle is built here in model space, independently of the reference's own sink code:
dequantized page rows are rotated back and un-centered, the sink rows replaced by the exact
sinks, then plain softmax attention in fp64. The reference must match it; the Triton decode
(attend from ``num_sink`` on, log-sum-exp, merge) and the SDPA extend (overwrite the
dequantized rows) must match the reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from paged_setup import paged_case

from sawkv.attention.reference import (
    _gather,
    paged_attention_decode_ref,
    paged_attention_extend_ref,
)
from sawkv.kernels import paged_attention_decode, paged_attention_extend
from sawkv.kernels.launch import KernelConfig
from sawkv.kernels.sinks import SinkKV, merge_sinks
from sawkv.quant.hadamard import rotate


def _case(lens, *, d=64, h=2, bs=16, bits=4, had=64, rot_v=True, n=4, dtype=torch.float32,
          seed=0, k_half=False):  # fmt: skip
    """Pages of ``lens`` sequences (centered keys) plus exact sinks that differ from what the
    pages hold (outliers 8x larger, as real sinks are), so ignoring them cannot pass."""
    pages, tables, lens_t, fmt, k_mean = paged_case(
        lens, head_dim=d, num_kv_heads=h, block_size=bs, bits=bits, had_block=had,
        rotate_v=rot_v, dtype=dtype, seed=seed, with_mean=True, k_half=k_half,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1000)
    sk = (8 * torch.randn(len(lens), n, h, d, generator=g)).to(dtype)
    sv = (8 * torch.randn(len(lens), n, h, d, generator=g)).to(dtype)
    for s, x in enumerate(lens):  # positions past a sequence's length hold garbage
        sk[s, min(x, n) :] = float("nan")
        sv[s, min(x, n) :] = float("nan")
    return pages, tables, lens_t, fmt, SinkKV(sk, sv, k_mean)


def _oracle(q, pages, tables, lens, qsl, fmt, sinks, scale, window=0):
    """fp64 attention in model space: page rows rotated back and un-centered, sinks exact."""
    k_cache, v_cache, k_meta, v_meta = pages
    out = torch.zeros(q.shape, dtype=torch.float64)
    g = q.shape[1] // fmt.num_kv_heads
    for s in range(len(lens)):
        n_s = int(lens[s])
        nb = math.ceil(n_s / fmt.block_size)
        blocks = tables[s, :nb].long()
        k = _gather(k_cache, k_meta, blocks, fmt.bits, True)[:, :n_s].double()  # [H, L, d]
        v = _gather(v_cache, v_meta, blocks, fmt.bits, False)[:, :n_s].double()
        if fmt.had_block:
            k = rotate(k, fmt.had_block)
            v = rotate(v, fmt.had_block) if fmt.rotate_v else v
        k = k + sinks.k_mean.double()[:, None]
        m = min(sinks.num_sink, n_s)
        k[:, :m] = sinks.k[s, :m].double().transpose(0, 1)
        v[:, :m] = sinks.v[s, :m].double().transpose(0, 1)
        for t in range(qsl[s], qsl[s + 1]):
            qpos = n_s - (qsl[s + 1] - t)
            lo = max(0, qpos - window + 1) if window else 0
            for hq in range(q.shape[1]):
                hk = hq // g
                sc = (k[hk, lo : qpos + 1] @ q[t, hq].double()) * scale
                out[t, hq] = torch.softmax(sc, 0) @ v[hk, lo : qpos + 1]
    return out


@pytest.mark.parametrize("bits, had, rot_v", [(4, 64, True), (4, 0, False), (8, 32, False)])
def test_reference_sinks_match_model_space_oracle(bits, had, rot_v):
    lens = [37, 3, 20]
    pages, tables, lens_t, fmt, sinks = _case(lens, bits=bits, had=had, rot_v=rot_v)
    q = torch.randn(3, 4, 64)
    qsl = [0, 1, 2, 3]
    dec = paged_attention_decode_ref(q, pages, tables, lens_t, fmt, scale=0.125, sinks=sinks)
    want = _oracle(q, pages, tables, lens_t, qsl, fmt, sinks, 0.125)
    torch.testing.assert_close(dec.double(), want, rtol=0, atol=1e-4)
    q_lens = [10, 3, 20]
    qsl = [0, 10, 13, 33]
    qe = torch.randn(33, 4, 64)
    qsl_t = torch.tensor(qsl, dtype=torch.int32)
    ext = paged_attention_extend_ref(qe, pages, tables, lens_t, qsl_t, fmt, scale=0.125,
                                     sinks=sinks)  # fmt: skip
    want = _oracle(qe, pages, tables, lens_t, qsl, fmt, sinks, 0.125)
    torch.testing.assert_close(ext.double(), want, rtol=0, atol=1e-4)
    assert sum(q_lens) == 33
    # the sinks matter: without them the answer is far off
    plain = paged_attention_decode_ref(q, pages, tables, lens_t, fmt, scale=0.125)
    assert (plain - dec).abs().max() > 0.1


# (lens, ratio, splits, window, dtype, rot_v, bits)
DECODE_CASES = [
    ([37, 3, 20], 2, 1, 0, torch.float32, False, 4),
    ([37, 3, 20], 2, 3, 0, torch.float32, True, 4),  # split-K merge + output rotation
    ([70, 1, 5], 4, 2, 0, torch.float16, False, 8),  # a sequence that is all sink
    ([90, 40], 1, 2, 30, torch.float32, False, 4),  # window past the sinks for the first
    ([12, 4], 8, 1, 10, torch.float16, True, 4),  # window that still holds some sinks
]
# ... the last field: keys with one (scale, min) per half (k_half_meta)
DECODE_CASES = [(*c, False) for c in DECODE_CASES] + [
    ([37, 3, 20], 2, 3, 0, torch.float32, True, 4, True),
]


@pytest.mark.parametrize("lens, ratio, splits, window, dtype, rot_v, bits, k_half", DECODE_CASES)
def test_triton_decode_with_sinks_matches_reference(lens, ratio, splits, window, dtype, rot_v,
                                                    bits, k_half):  # fmt: skip
    pages, tables, lens_t, fmt, sinks = _case(lens, rot_v=rot_v, bits=bits, dtype=dtype, seed=1,
                                              k_half=k_half)  # fmt: skip
    q = torch.randn(len(lens), 2 * ratio, 64).to(dtype)
    kw = dict(scale=0.125, sliding_window=window, sinks=sinks)
    out = torch.full_like(q, float("nan"))
    cfg = KernelConfig(block_n=16, num_splits=splits)
    paged_attention_decode(q, pages, tables, lens_t, fmt, out=out, config=cfg, **kw)
    ref = paged_attention_decode_ref(q, pages, tables, lens_t, fmt, **kw)
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=atol)


@pytest.mark.parametrize(
    "rot_v, bits, dtype, window",
    [(True, 4, torch.float32, 0), (False, 8, torch.float16, 0), (True, 4, torch.float32, 9)],
)
def test_sdpa_extend_with_sinks_matches_reference(rot_v, bits, dtype, window):
    lens, q_lens = [37, 3, 20], [10, 3, 20]
    pages, tables, lens_t, fmt, sinks = _case(lens, rot_v=rot_v, bits=bits, dtype=dtype, seed=2)
    qsl = torch.tensor([0, 10, 13, 33], dtype=torch.int32)
    q = torch.randn(sum(q_lens), 4, 64).to(dtype)
    out = torch.full_like(q, float("nan"))
    kw = dict(scale=0.125, sinks=sinks, sliding_window=window)
    paged_attention_extend(q, pages, tables, lens_t, qsl, fmt, out=out, impl="sdpa", **kw)
    ref = paged_attention_extend_ref(q, pages, tables, lens_t, qsl, fmt, **kw)
    # fp16 rows: outputs of magnitude ~8 (the sinks are outliers) carry fp16 rounding
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-3), err


def test_sinks_refused_where_not_served():
    pages, tables, lens_t, fmt, sinks = _case([20, 5])
    qsl = torch.tensor([0, 4, 9], dtype=torch.int32)
    q = torch.randn(9, 4, 64)
    with pytest.raises(ValueError, match="SDPA extend path only"):
        paged_attention_extend(q, pages, tables, lens_t, qsl, fmt, scale=0.125, sinks=sinks,
                               impl="triton")  # fmt: skip
    bad = SinkKV(sinks.k[:1], sinks.v[:1], sinks.k_mean)
    with pytest.raises(ValueError, match="sink k has shape"):
        paged_attention_decode_ref(q[:2], pages, tables, lens_t, fmt, scale=0.125, sinks=bad)


def test_merge_sinks_alone_and_with_nothing_to_attend():
    """A main part that attended nothing (lse -inf) leaves the sinks' softmax alone; a query
    with neither gets zeros, not NaN."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 8, generator=g)
    sk, sv = torch.randn(2, 3, 1, 8, generator=g), torch.randn(2, 3, 1, 8, generator=g)
    lse = torch.full((2, 2), float("-inf"))
    o = torch.full((2, 2, 8), float("nan"))  # never read where lse is -inf
    lens = torch.tensor([3, 0], dtype=torch.int32)
    res = merge_sinks(q, o.nan_to_num(0.0), lse, SinkKV(sk, sv), lens, scale=0.5)
    p = torch.softmax(torch.einsum("hd,nd->hn", q[0], sk[0, :, 0]) * 0.5, -1)
    torch.testing.assert_close(res[0], p @ sv[0, :, 0])
    assert torch.equal(res[1], torch.zeros(2, 8))
