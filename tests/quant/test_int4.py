from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sawkv.quant.int4 import (
    FP16_MAX,
    dequantize_fp8,
    dequantize_int,
    pack_int4,
    quantize_fp8,
    quantize_int,
    unpack_int4,
)


def _step_bound(x: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Largest allowed |x - x_hat| per element: half a quantization step, plus the rounding
    of (scale, min) to fp16 (one ulp of min, and qmax fp16-ulps of scale at the top code)."""
    d = x.shape[-1]
    g = group or d
    xg = x.float().reshape(*x.shape[:-1], d // g, g)
    rng = xg.amax(-1, keepdim=True) - xg.amin(-1, keepdim=True)
    mag = xg.abs().amax(-1, keepdim=True)
    step = rng / (2**bits - 1)
    bound = 0.5 * step + mag * 2**-10 + rng * 2**-10 + 1e-6
    return bound.expand_as(xg).reshape(x.shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 16, 32])
def test_error_within_half_a_step(bits, group):
    torch.manual_seed(bits)
    x = torch.randn(7, 4, 64) * torch.rand(7, 4, 1) * 10
    codes, meta = quantize_int(x, bits, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert meta.shape == (7, 4, 64 // (group or 64), 2) and meta.dtype == torch.float16
    err = (dequantize_int(codes, meta) - x).abs()
    assert (err <= _step_bound(x, bits, group)).all()


def test_codes_match_a_direct_formula():
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    codes, meta = quantize_int(x, 4)
    scale, mn = meta[0, 0].float()
    assert mn == -1.0 and scale == torch.tensor(0.2, dtype=torch.float16).float()
    expected = torch.floor((x - mn) / scale + 0.5).clamp(0, 15)
    assert torch.equal(codes.float(), expected)
    assert codes[0, 0] == 0 and codes[0, -1] == 15


@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_pack_unpack_roundtrip(vals):
    codes = torch.tensor(vals, dtype=torch.uint8).reshape(1, -1)
    packed = pack_int4(codes)
    assert packed.shape == (1, len(vals) // 2)
    assert torch.equal(unpack_int4(packed), codes)
    # layout: low nibble element i, high nibble element i + d/2
    h = len(vals) // 2
    assert int(packed[0, 0]) == vals[0] | (vals[h] << 4)


def test_pack_rejects_odd_dim():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, dtype=torch.uint8))


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(finite, st.sampled_from([0.0, 1e-30, -1e-30, 1e30, 7.0])),
        min_size=16,
        max_size=16,
    ),
    st.sampled_from([2, 3, 4, 8]),
)
def test_property_any_finite_vector(vals, bits):
    x = torch.tensor(vals, dtype=torch.float32)
    codes, meta = quantize_int(x, bits)
    assert torch.isfinite(meta.float()).all()
    y = dequantize_int(codes, meta)
    assert torch.isfinite(y).all()
    xs = x.clamp(-FP16_MAX, FP16_MAX)  # documented saturation
    assert (y - xs).abs().max() <= _step_bound(xs, bits, None).max()


@pytest.mark.parametrize("value", [0.0, 3.25, -1234.5])
def test_constant_vector_is_exact(value):
    x = torch.full((2, 64), value)
    codes, meta = quantize_int(x, 4)
    assert torch.all(meta[..., 0] == 0) and torch.all(codes == 0)
    # exact up to the fp16 rounding of min
    torch.testing.assert_close(dequantize_int(codes, meta), x.half().float(), rtol=0, atol=0)


def test_tiny_range_no_division_by_zero():
    x = 1.0 + torch.arange(64, dtype=torch.float32) * 1e-9  # range below fp16 resolution
    codes, meta = quantize_int(x, 4)
    y = dequantize_int(codes, meta)
    assert torch.isfinite(y).all() and (y - x).abs().max() < 1e-3


def test_nan_and_inf_defined():
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 1.0] * 4)
    codes, meta = quantize_int(x, 4)
    y = dequantize_int(codes, meta)
    assert torch.isfinite(y).all()
    assert y[1] == pytest.approx(FP16_MAX, rel=1e-3) and y[2] == pytest.approx(-FP16_MAX, rel=1e-3)
    # NaN is read as 0, so it lands on the code nearest 0
    assert abs(float(y[0])) <= float(meta[0, 0]) / 2 + 1e-3 * FP16_MAX


def test_huge_outlier_keeps_fp16_metadata_finite():
    x = torch.randn(64)
    x[3] = 1e9
    codes, meta = quantize_int(x, 8)
    assert torch.isfinite(meta.float()).all()
    assert dequantize_int(codes, meta)[3] == pytest.approx(FP16_MAX, rel=1e-2)


def test_fp8_roundtrip_and_zeros():
    x = torch.randn(4, 2, 64) * 3
    q, s = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (4, 2, 1)
    y = dequantize_fp8(q, s)
    # e4m3 has 3 mantissa bits: relative error <= 2**-4 for normal numbers
    rel = ((y - x).abs() / x.abs().amax(-1, keepdim=True)).max()
    assert rel <= 2**-4 + 1e-6
    q0, s0 = quantize_fp8(torch.zeros(3, 8))
    assert torch.equal(dequantize_fp8(q0, s0), torch.zeros(3, 8))
    assert math.isfinite(float(quantize_fp8(torch.tensor([float("nan"), 1.0]))[1][0]))
