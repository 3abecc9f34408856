"""GPTQ-style keys: Hessian-weighted error <= plain rounding; identity Hessian == plain rounding."""

from __future__ import annotations

import pytest
import torch

from sawkv.quant import parse_method
from sawkv.quant.hessian import gptq_quantize, weighted_error


def _queries(n, d, seed=0):
    """Anisotropic, correlated queries (as attention queries are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.linspace(0.1, 3, d)
    return torch.randn(n, d, generator=g) @ mix


@pytest.mark.parametrize("bits,group", [(4, None), (3, None), (2, 8)])
def test_weighted_error_not_above_rtn(bits, group):
    d = 32
    q = _queries(2000, d)
    h = q.T @ q / q.shape[0]
    torch.manual_seed(1)
    x = torch.randn(400, d) * 2
    gptq = gptq_quantize(x, h, bits, group)
    rtn = parse_method(f"int{bits}" + (f"-g{group}" if group else ""), d).fake_quant(x, is_key=True)
    e_gptq, e_rtn = weighted_error(x, gptq, h), weighted_error(x, rtn, h)
    assert e_gptq < 0.9 * e_rtn  # a clear win on the objective it minimises
    # and it stays on the token-wise grid: every value is code * scale + min
    from sawkv.quant.hessian import grid_of

    scale, mn = grid_of(x, bits, group)
    codes = (gptq - mn) / torch.where(scale > 0, scale, 1.0)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= -1e-3 and codes.max() <= 2**bits - 1 + 1e-3


def test_identity_hessian_is_plain_rounding():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    got = gptq_quantize(x, torch.eye(16), 4)
    ref = parse_method("int4", 16).fake_quant(x, is_key=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_method_uses_rotated_hessian_and_plain_values():
    d, h = 16, 2
    q = _queries(1000, d)
    hess = torch.stack([q.T @ q / 1000] * h)
    m = parse_method("gptq4-bdr16-kc", d)
    with pytest.raises(ValueError, match="not calibrated"):
        m.fake_quant_seq(torch.randn(4, h, d), is_key=True, layer_idx=0)
    m = m.fit([hess])
    torch.manual_seed(2)
    x = torch.randn(200, h, d) + 3.0
    mu = x.mean(0)
    base = parse_method("int4-bdr16-kc", d)
    # values: exactly the token-wise method
    v = m.fake_quant_seq(x, is_key=False, layer_idx=0)
    torch.testing.assert_close(v, base.fake_quant(x, is_key=False))
    # keys: lower query-weighted error than the token-wise method on the same grid
    k = m.fake_quant_seq(x, is_key=True, layer_idx=0, k_mean=mu)
    k_rtn = base.fake_quant(x, is_key=True, k_mean=mu)
    for i in range(h):
        assert weighted_error(x[:, i], k[:, i], hess[i]) < weighted_error(
            x[:, i], k_rtn[:, i], hess[i]
        )
    assert m.bits_per_element(d) == base.bits_per_element(d)


def test_gptq_names():
    assert parse_method("gptq4-kc-bdr64", 64).name == "gptq4-bdr64-kc"
    assert parse_method("gptq3-g32").name == "gptq3-g32"
    for bad in ("gptq5", "gptq4-kv", "gptq4-kc-kc"):
        with pytest.raises(ValueError):
            parse_method(bad)
