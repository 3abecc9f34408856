"""KIVI: per-channel key groups and per-token values against a loop-by-loop reference."""

from __future__ import annotations

import pytest
import torch

from sawkv.quant import parse_method
from sawkv.quant.int4 import dequantize_int, quantize_int
from sawkv.quant.kivi import KiviMethod


def ref_kivi(x, bits, g, r, is_key):
    """Independent reference: one quantize_int call per (group, head, channel) or per token."""
    s, h, d = x.shape
    n = max(0, s - r) // g * g
    out = x.clone().float()
    for t0 in range(0, n, g):
        for hh in range(h):
            if is_key:
                for c in range(d):
                    v = x[t0 : t0 + g, hh, c].float()
                    codes, meta = quantize_int(v, bits)
                    out[t0 : t0 + g, hh, c] = dequantize_int(codes, meta)
            else:
                for t in range(t0, t0 + g):
                    gv = min(g, d)
                    for c0 in range(0, d, gv):
                        v = x[t, hh, c0 : c0 + gv].float()
                        codes, meta = quantize_int(v, bits)
                        out[t, hh, c0 : c0 + gv] = dequantize_int(codes, meta)
    return out


@pytest.mark.parametrize("bits,g,r,seq", [(2, 8, 4, 37), (4, 16, 0, 32), (3, 8, 16, 20)])
@pytest.mark.parametrize("is_key", [True, False])
def test_kivi_matches_reference(bits, g, r, seq, is_key):
    torch.manual_seed(0)
    x = torch.randn(seq, 2, 16) * torch.linspace(0.1, 5, 16)
    m = parse_method(f"kivi{bits}-g{g}-r{r}", 16)
    got = m.fake_quant_seq(x, is_key=is_key, layer_idx=0)
    torch.testing.assert_close(got, ref_kivi(x, bits, g, r, is_key), atol=1e-6, rtol=0)


def test_residual_window_is_exact_and_group_aligned():
    m = KiviMethod(bits=2, group_size=32, residual=128)
    assert [m.num_quantized(n) for n in (100, 128, 159, 160, 300)] == [0, 0, 0, 32, 160]
    x = torch.randn(300, 1, 64)
    y = m.fake_quant_seq(x, is_key=True, layer_idx=0)
    assert torch.equal(y[160:], x[160:])  # 140 most recent tokens untouched (R <= 140 < R + G)
    assert not torch.equal(y[:160], x[:160])


def test_per_channel_keys_absorb_a_channel_offset():
    """A constant offset in one channel costs per-token INT2 its range; per-channel does not."""
    torch.manual_seed(0)
    x = torch.randn(64, 1, 32)
    x[:, :, 5] += 40.0
    kivi = KiviMethod(bits=2, group_size=32, residual=0).fake_quant_seq(x, is_key=True)
    tok = parse_method("int2", 32).fake_quant(x, is_key=True)
    assert (kivi - x).pow(2).mean() < 0.2 * (tok - x).pow(2).mean()


def test_names_and_bits():
    assert parse_method("kivi2").name == "kivi2-g32-r128"
    assert parse_method("kivi4-r64-g64").name == "kivi4-g64-r64"
    # keys: 4 + 32/32, values: one fp16 pair per 32 channels -> 5 bits both
    assert parse_method("kivi4", 128).bits_per_element(128) == pytest.approx(5.0)
    # G larger than head_dim: values grouped over the whole head
    assert parse_method("kivi2-g128", 64).bits_per_element(64) == pytest.approx((2.25 + 2.5) / 2)
    for bad in ("kivi5", "kivi2-g0", "kivi2-x3", "kivi2-g8-g8"):
        with pytest.raises(ValueError):
            parse_method(bad)
    with pytest.raises(ValueError, match="does not divide"):
        parse_method("kivi2-g24", 64)
