"""The CUDA decode kernel's arithmetic, emulated in torch at 131,072 tokens, vs an fp64 reference.

The GPU benchmark checks the kernel itself against the fp32 reference up to 128K tokens; this
CPU test pins the numerical scheme it implements (``csrc/paged_decode.cuh``): codes as exact
integers (fp16 subnormals c * 2^-24 on the GPU, no offset to cancel), the query scaled by a
power of two before its fp16 rounding, fp32 scores and
softmax state, and P.V weights ``p * scale_v * 2^-E`` rounded to fp16, accumulated tile by tile in
fp32 as the kernel's online softmax does. The contrast case drops the 2^-E normalization: with
small value scales the fp16 weights fall into subnormals and the error at long context exceeds
the 5e-3 budget, which is the class of bug this test exists to catch.
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.4426950408889634


def _reference(q, kc, km, vc, vm, scale):
    k = kc.double() * km[:, :1].double() + km[:, 1:].double()
    v = vc.double() * vm[:, :1].double() + vm[:, 1:].double()
    p = torch.softmax(q.double() @ k.T * scale, dim=-1)
    return p @ v


def _emulate(q, kc, km, vc, vm, scale, *, normalize_weights=True, tile=32, off=0.0):
    """Tile-by-tile emulation of one CTA of the kernel (one KV head, all its query heads)."""
    x = q.float() * (scale * LOG2E)
    e = math.frexp(float(x.abs().max()))[1]
    f, finv = 2.0 ** (14 - e), 2.0 ** (e - 14)
    qh = (x * f).half()
    qsum = qh.float().sum(-1) * finv
    g = q.shape[0]
    m = torch.full((g,), -math.inf)
    lsum = torch.zeros(g)
    vmacc = torch.zeros(g)
    acc = torch.zeros(g, q.shape[1])
    big_e = -126
    for t0 in range(0, kc.shape[0], tile):
        ck = (kc[t0 : t0 + tile].float() - off).half().float()  # exact small integers
        cv = (vc[t0 : t0 + tile].float() - off).half().float()
        ks, kmin = km[t0 : t0 + tile, 0].float(), km[t0 : t0 + tile, 1].float()
        vs, vmin = vm[t0 : t0 + tile, 0].float(), vm[t0 : t0 + tile, 1].float()
        s = (qh.float() @ ck.T) * (ks * finv) + (kmin + off * ks) * qsum[:, None]
        m_new = torch.maximum(m, s.max(-1).values)
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - m_new[:, None])
        lsum = lsum * alpha + p.sum(-1)
        vmacc = vmacc * alpha + p @ (vmin + off * vs)
        if normalize_weights:
            e_new = max(big_e, math.frexp(float(vs.max()))[1])
            w = (p * vs * 2.0**-e_new).half().float()
            acc = acc * (alpha * 2.0 ** (big_e - e_new))[:, None] + w @ cv
            big_e = e_new
        else:
            w = (p * vs).half().float()
            acc = acc * alpha[:, None] + w @ cv
        m = m_new
    if normalize_weights:
        acc = acc * 2.0**big_e
    return (acc + vmacc[:, None]) / lsum[:, None]


def _case(num_tokens, head_dim=128, g=4, v_scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(g, head_dim, generator=gen).to(torch.bfloat16)
    kc = torch.randint(0, 16, (num_tokens, head_dim), generator=gen)
    vc = torch.randint(0, 16, (num_tokens, head_dim), generator=gen)
    km = torch.stack(
        [
            torch.rand(num_tokens, generator=gen) * 0.3 + 0.05,
            -torch.rand(num_tokens, generator=gen),
        ],
        -1,
    ).half()
    vm = torch.stack(
        [
            (torch.rand(num_tokens, generator=gen) + 0.5) * v_scale,
            -torch.rand(num_tokens, generator=gen) * v_scale * 8,
        ],
        -1,
    ).half()
    return q, kc, km, vc, vm


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def test_kernel_arithmetic_within_5e3_at_128k():
    q, kc, km, vc, vm = _case(131072)
    scale = 128**-0.5
    ref = _reference(q, kc, km, vc, vm, scale)
    assert _rel(_emulate(q, kc, km, vc, vm, scale), ref) < 5e-3


def test_unnormalized_fp16_weights_fail_with_small_value_scales():
    # value scales of ~1e-5 (near-constant values): p * scale_v falls into fp16 subnormals
    q, kc, km, vc, vm = _case(32768, v_scale=1e-5, seed=1)
    scale = 128**-0.5
    ref = _reference(q, kc, km, vc, vm, scale)
    assert _rel(_emulate(q, kc, km, vc, vm, scale), ref) < 5e-3
    assert _rel(_emulate(q, kc, km, vc, vm, scale, normalize_weights=False), ref) > 5e-3
