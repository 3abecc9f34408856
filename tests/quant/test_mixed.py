"""Mixed precision: budget respected, most sensitive units promoted, per-head levels, sinks."""

from __future__ import annotations

import pytest
import torch

from sawkv.quant import parse_method


@pytest.mark.parametrize("budget", [4.0, 4.25, 4.5, 5.0, 6.0, 8.0, 2.0, 3.0, 3.7])
@pytest.mark.parametrize("shape", [(30, 3), (18, 1), (7, 2)])
def test_budget_respected_and_tight(budget, shape):
    torch.manual_seed(0)
    sens = torch.rand(shape)
    m = parse_method(f"mixed{budget}", 64).fit(sens)
    lo, hi = m.levels
    avg = m.average_code_bits()
    assert avg <= budget + 1e-9
    # tight: one more promoted unit would break the budget (unless everything is high)
    n = sens.numel()
    assert avg == hi or avg + (hi - lo) / n > budget
    # promoted units are exactly the most sensitive ones
    promoted = m.allocation == hi
    if promoted.any() and (~promoted).any():
        assert sens[promoted].min() >= sens[~promoted].max()


def test_per_head_levels_and_sinks():
    torch.manual_seed(0)
    alloc_sens = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # budget 6 -> half of 4 units at INT8
    m = parse_method("mixed6-s3", 32).fit(alloc_sens)
    assert m.allocation.tolist() == [[4, 8], [8, 4]]
    x = torch.randn(20, 2, 32) * 3
    mu = torch.randn(2, 32)
    y = m.fake_quant_seq(x, is_key=True, layer_idx=0, k_mean=mu)
    i4 = parse_method("int4-bdr32-kc", 32).fake_quant(x, is_key=True, k_mean=mu)
    i8 = parse_method("int8-bdr32-kc", 32).fake_quant(x, is_key=True, k_mean=mu)
    assert torch.equal(y[:3], x[:3])  # sinks in full precision
    torch.testing.assert_close(y[3:, 0], i4[3:, 0])
    torch.testing.assert_close(y[3:, 1], i8[3:, 1])
    # a chunk starting past the sinks is fully quantized
    y2 = m.fake_quant_seq(x, is_key=True, layer_idx=0, k_mean=mu, start=5)
    torch.testing.assert_close(y2[:, 0], i4[:, 0])
    # bits incl. metadata: half at 4.5, half at 8.5 (head_dim 32: 4 bytes metadata per 32)
    assert m.bits_per_element(32) == pytest.approx((5.0 + 9.0) / 2)


def test_mixed_names():
    assert parse_method("mixed4.5", 64).name == "mixed4.5-bdr64"
    assert parse_method("mixed4.50-s4-kv").name == "mixed4.5-kv-s4"
    with pytest.raises(ValueError, match="not calibrated"):
        parse_method("mixed4.5", 64).fake_quant_seq(torch.zeros(2, 1, 64), is_key=True, layer_idx=0)
    for bad in ("mixed9", "mixed1", "mixed4.5-q", "mixed4.5-s1-s2"):
        with pytest.raises(ValueError):
            parse_method(bad)
