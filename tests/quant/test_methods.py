from __future__ import annotations

import pytest
import torch

from sawkv.quant.hadamard import rotate
from sawkv.quant.int4 import dequantize_int, quantize_int
from sawkv.quant.methods import parse_method


@pytest.mark.parametrize(
    "name,canonical",
    [
        ("int4", "int4"),
        ("int4-bdr64", "int4-bdr64"),
        ("int4-kc-bdr128", "int4-bdr128-kc"),
        ("int4-kv-kc-bdr128", "int4-bdr128-kv-kc"),
        ("int4-kh-kc-kv-bdr64", "int4-bdr64-kv-kc-kh"),
        ("int8-kh", "int8-kh"),
        ("int4-g32", "int4-g32"),
        ("int3-bdr-kc", "int3-bdr-kc"),
        ("INT8", "int8"),
        ("bf16", "bf16"),
        ("fp8", "fp8"),
        ("auto", "auto"),
    ],
)
def test_names_are_canonical(name, canonical):
    assert parse_method(name).name == canonical


def test_bare_bdr_resolves_to_min_128_head_dim():
    assert parse_method("int4-bdr", 64).had_block == 64
    assert parse_method("int4-bdr", 256).had_block == 128
    assert parse_method("int3-bdr-kc", 128).name == "int3-bdr128-kc"


@pytest.mark.parametrize(
    "name,match",
    [
        ("int5", "bits must be one of"),
        ("int4-foo", "suffix '-foo'"),
        ("int4-kv", "needs '-bdr'"),
        ("nope-bogus", "not a method family"),
        ("int4-g32-g16", "given twice"),
        ("int4-kh-kh", "given twice"),
        ("int4-g32-kh", "'-kh'.*cannot be combined with '-g"),
        ("", "empty"),
    ],
)
def test_bad_names(name, match):
    with pytest.raises(ValueError, match=match):
        parse_method(name)


def test_errors_name_valid_choices():
    with pytest.raises(ValueError, match=r"valid: \[16, 32, 64\]"):
        parse_method("int4-bdr128", 64)
    with pytest.raises(ValueError, match="does not divide head_dim 64"):
        parse_method("int4-g48", 64)


@pytest.mark.parametrize(
    "name,head_dim,bits",
    [("int4", 128, 4.25), ("int4", 64, 4.5), ("int8", 128, 8.25), ("bf16", 64, 16),
     # -kh: keys bits + 64/d, values bits + 32/d
     ("int4-bdr64-kc-kh", 64, 4.75), ("int4-kh", 128, 4.375), ("int8-kh", 256, 8.1875)],
)  # fmt: skip
def test_bits_per_element(name, head_dim, bits):
    assert parse_method(name, head_dim).bits_per_element(head_dim) == bits


@pytest.mark.parametrize("head_dim,ratio", [(64, 3.56), (128, 3.76)])
def test_int4_storage_bytes(head_dim, ratio):
    m = parse_method("int4-bdr", head_dim)
    x = torch.randn(10, 3, head_dim)
    enc = m.encode(x, is_key=True)
    assert enc.data.dtype == torch.uint8 and enc.data.shape == (10, 3, head_dim // 2)
    assert enc.nbytes == 10 * 3 * (head_dim // 2 + 4)
    assert round(x.numel() * 2 / enc.nbytes, 2) == ratio


def test_encode_is_rotate_then_quantize():
    m = parse_method("int4-bdr32-kc", 64)
    k = torch.randn(6, 2, 64)
    mu = torch.randn(2, 64)
    enc = m.encode(k, is_key=True, k_mean=mu)
    codes, meta = quantize_int(rotate(k - mu, 32), 4)
    assert torch.equal(enc.meta, meta)
    torch.testing.assert_close(
        m.decode(enc, is_key=True, rotated=True), dequantize_int(codes, meta)
    )
    # model space: un-rotate and add the mean back
    torch.testing.assert_close(
        m.decode(enc, is_key=True, k_mean=mu), rotate(dequantize_int(codes, meta), 32) + mu
    )


def test_kh_quantizes_each_half_of_the_rotated_key_on_its_own():
    """Keys: one (scale, min) per half of ``R (k - mu)``; values keep one pair per vector;
    the stored bytes are what ``-kh`` is accounted at."""
    m = parse_method("int4-bdr32-kc-kh", 64)
    k = torch.randn(6, 2, 64)
    # Hadamard blocks of 32 keep the halves apart: the hi half's range is 10x the lo's, so one
    # shared step would waste the lo half's codes
    k[..., 32:] *= 10
    mu = torch.randn(2, 64)
    enc = m.encode(k, is_key=True, k_mean=mu)
    y = rotate(k - mu, 32)
    lo_codes, lo_meta = quantize_int(y[..., :32], 4)
    hi_codes, hi_meta = quantize_int(y[..., 32:], 4)
    assert enc.meta.shape == (6, 2, 2, 2)
    assert torch.equal(enc.meta[..., 0, :], lo_meta[..., 0, :])
    assert torch.equal(enc.meta[..., 1, :], hi_meta[..., 0, :])
    want = torch.cat([dequantize_int(lo_codes, lo_meta), dequantize_int(hi_codes, hi_meta)], -1)
    torch.testing.assert_close(m.decode(enc, is_key=True, rotated=True), want)
    ev = m.encode(torch.randn(6, 2, 64), is_key=False)
    assert ev.meta.shape == (6, 2, 1, 2)
    assert enc.nbytes + ev.nbytes == 2 * 6 * 2 * 64 * m.bits_per_element(64) / 8
    # finer groups: the same keys come back closer than with one pair per key
    plain = parse_method("int4-bdr32-kc", 64)
    err_kh = (m.fake_quant(k, is_key=True, k_mean=mu) - k)[..., :32].pow(2).mean()
    err_plain = (plain.fake_quant(k, is_key=True, k_mean=mu) - k)[..., :32].pow(2).mean()
    assert err_kh < err_plain / 10


def test_values_rotate_only_with_kv():
    v = torch.randn(4, 2, 64)
    assert parse_method("int4-bdr64", 64).transform(v, is_key=False).equal(v)
    kv = parse_method("int4-bdr64-kv", 64)
    torch.testing.assert_close(kv.transform(v, is_key=False), rotate(v, 64))


def test_centering_is_exact_for_attention():
    """softmax(q.(k - mu)) == softmax(q.k): the read path needs no correction."""
    torch.manual_seed(0)
    q, k, mu = torch.randn(64), torch.randn(20, 64), torch.randn(64) * 10
    torch.testing.assert_close(torch.softmax(k @ q, 0), torch.softmax((k - mu) @ q, 0))


def test_rotation_rescues_an_outlier_channel():
    torch.manual_seed(0)
    k = torch.randn(256, 1, 64)
    k[..., 7] *= 40  # one outlier channel, as seen in real keys
    naive = parse_method("int4", 64).fake_quant(k, is_key=True)
    bdr = parse_method("int4-bdr64", 64).fake_quant(k, is_key=True)
    mask = torch.ones(64, dtype=torch.bool)
    mask[7] = False
    err_naive = (naive - k)[..., mask].pow(2).mean()
    err_bdr = (bdr - k)[..., mask].pow(2).mean()
    assert err_bdr < err_naive / 4


def test_centering_rescues_an_offset_channel():
    torch.manual_seed(0)
    k = torch.randn(256, 1, 128)
    k[..., 3] += 60.0  # constant offset (qkv bias)
    mu = k.mean(0)
    plain = parse_method("int4-bdr128", 128).fake_quant(k, is_key=True)
    centered = parse_method("int4-bdr128-kc", 128).fake_quant(k, is_key=True, k_mean=mu)
    assert (centered - k).pow(2).mean() < (plain - k).pow(2).mean() / 5


def test_auto_and_float_methods():
    x = torch.randn(3, 2, 64, dtype=torch.float32)
    assert parse_method("auto", 64).fake_quant(x, is_key=True) is x
    y = parse_method("bf16", 64).fake_quant(x, is_key=False)
    torch.testing.assert_close(y, x.to(torch.bfloat16).float())


def test_servable():
    assert parse_method("int4-bdr128-kc").is_servable
    assert parse_method("int8").is_servable
    assert not parse_method("int3-bdr").is_servable
    assert not parse_method("int4-g32").is_servable
    assert parse_method("int4-bdr64-kv-kc-kh").is_servable
    assert parse_method("int8-kh").is_servable
    assert not parse_method("int3-kh").is_servable
    assert not parse_method("fp8").is_servable
