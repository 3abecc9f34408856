"""saw-int4 recipes: per-layer formats, bits against hand counts, storage, validation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sawkv.quant import parse_method
from sawkv.quant.recipe import (
    SAW_INT4,
    SAW_INT4_FALLBACK,
    Recipe,
    default_budget,
    is_saw_int4,
    plain_int4_bits,
    smoothing_scales,
)

D, H = 64, 2
LAYERS = ("int4-bdr64-kv-kc", "int8-bdr32-kc", "int4-bdr16", "int4", "int4-bdr32-kc-kh")


def make_recipe(names=LAYERS, budget=None, seed=0) -> Recipe:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(len(names), H, D, generator=g)
    return Recipe(tuple(parse_method(n, D) for n in names), D, H, means, budget, {"t": 1})


def test_default_budget_is_plain_int4_plus_quarter_bit():
    # (4 bits * d + one fp16 (scale, min) pair = 32 bits) / d, plus 0.25
    assert [default_budget(d) for d in (64, 128, 256)] == [4.75, 4.5, 4.375]
    assert plain_int4_bits(128) == (4 * 128 + 32) / 128


def test_bits_per_element_counts_codes_and_metadata_per_layer():
    r = make_recipe()
    # -kh: keys carry two fp16 pairs (64 bits), values one
    kh = (4 * D + 64 + 4 * D + 32) / (2 * D)
    by_hand = [(4 * D + 32) / D, (8 * D + 32) / D, (4 * D + 32) / D, (4 * D + 32) / D, kh]
    assert r.bits_per_element() == pytest.approx(sum(by_hand) / 5)
    assert r.counts() == {"int4-bdr64-kv-kc": 1, "int8-bdr32-kc": 1, "int4-bdr16": 1, "int4": 1,
                          "int4-bdr32-kc-kh": 1}  # fmt: skip
    assert r.summary() == (
        "0 int4-bdr64-kv-kc; 1 int8-bdr32-kc; 2 int4-bdr16; 3 int4; 4 int4-bdr32-kc-kh"
    )


def test_fake_quant_seq_uses_each_layers_format_and_its_own_means():
    r = make_recipe()
    x = torch.randn(7, H, D) * 3 + 5
    for i, name in enumerate(LAYERS):
        m = parse_method(name, D)
        mu = r.k_means[i] if m.center_k else None
        want = m.fake_quant(x, is_key=True, k_mean=mu)
        got = r.fake_quant_seq(x, is_key=True, layer_idx=i, k_mean=torch.zeros(H, D))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_save_load_round_trip(tmp_path):
    r = make_recipe(budget=6.5)
    path = r.save(tmp_path / "r.safetensors")
    back = Recipe.load(path)
    assert back == r  # layers, shape, budget
    assert torch.equal(back.k_means, r.k_means) and back.info == {"t": 1}
    assert back.bits_per_element() == r.bits_per_element()


def test_validation_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not servable"):
        make_recipe(("int4-g32-bdr64",) * 4)
    with pytest.raises(ValueError, match="over its budget"):
        make_recipe(budget=4.75)  # one INT8 layer in five (+ one -kh) costs ~5.35
    with pytest.raises(ValueError, match="no key means"):
        Recipe((parse_method("int4-kc", D),), D, H, None)
    with pytest.raises(ValueError, match="shape"):
        Recipe((parse_method("int4-kc", D),), D, H, torch.zeros(2, H, D))
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"k_means": torch.zeros(1)}, str(bad), metadata={"recipe": "{}"})
    with pytest.raises(ValueError, match="malformed saw-int4 recipe"):
        Recipe.load(bad)


def _score_error(a, b, s):
    """``(sum a s^2)(sum b / s^2)``: the variance of the score error, up to a constant."""
    return (a * s**2).sum(-1) * (b / s**2).sum(-1)


def test_smoothing_scales_reach_the_cauchy_schwarz_minimum():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(3, 2, 16, generator=g, dtype=torch.float64) ** 4 + 1e-3
    b = torch.rand(3, 2, 16, generator=g, dtype=torch.float64) ** 4 + 1e-3
    s = smoothing_scales(a, b)
    assert s.shape == a.shape and s.dtype == torch.float32
    s = s.double()
    # rotary pairs (i, i + d/2) share a scale; the scales' geometric mean is 1
    torch.testing.assert_close(s[..., :8], s[..., 8:])
    torch.testing.assert_close(s.log().mean(-1), torch.zeros(3, 2).double(), atol=1e-6, rtol=0)
    # pair-tied, the error is (sum_p A_p s_p^2)(sum_p B_p / s_p^2) >= (sum_p sqrt(A_p B_p))^2
    pa, pb = a[..., :8] + a[..., 8:], b[..., :8] + b[..., 8:]
    bound = (pa * pb).sqrt().sum(-1) ** 2
    torch.testing.assert_close(_score_error(a, b, s), bound, rtol=1e-5, atol=0)
    assert bool((_score_error(a, b, s) < _score_error(a, b, torch.ones_like(s))).all())
    for _ in range(20):  # any other pair-tied scales do worse
        p = torch.exp(0.3 * torch.randn(3, 2, 8, generator=g, dtype=torch.float64))
        other = s * torch.cat([p, p], -1)
        assert bool((_score_error(a, b, other) >= _score_error(a, b, s) * (1 - 1e-9)).all())


def test_smoothing_scales_defined_on_dead_channels_and_refuse_bad_input():
    a, b = torch.ones(1, 8), torch.ones(1, 8)
    a[0, 1] = a[0, 5] = 0.0  # no query reads rotary pair 1
    b[0, 2] = b[0, 6] = 0.0  # no key uses pair 2
    s = smoothing_scales(a, b)
    assert bool(torch.isfinite(s).all() and (s > 0).all())
    assert float(s.max()) <= 256 and float(s.min()) >= 1 / 256
    assert s[0, 1] > s[0, 0] > s[0, 2]  # shrink keys nobody reads, keep keys that are empty
    with pytest.raises(ValueError, match="even head_dim"):
        smoothing_scales(torch.ones(2, 7), torch.ones(2, 7))
    with pytest.raises(ValueError, match="one shape"):
        smoothing_scales(torch.ones(2, 8), torch.ones(3, 8))
    with pytest.raises(ValueError, match="finite"):
        smoothing_scales(torch.full((2, 8), float("nan")), torch.ones(2, 8))


def _smoothed(r: Recipe, k_scale: torch.Tensor) -> Recipe:
    return Recipe(r.layers, D, H, r.k_means / k_scale, r.budget, r.info, k_scale=k_scale)


def test_key_smoothing_by_a_power_of_two_changes_nothing():
    # per-token quantization is scale-invariant, so one scale on every channel (a power of
    # two: exact in floating point) must give the same keys as no smoothing
    r = make_recipe()
    sm = _smoothed(r, torch.full((len(LAYERS), H, D), 4.0))
    x = torch.randn(9, H, D) * 3 + 5
    for i in range(len(LAYERS)):
        want = r.fake_quant_seq(x, is_key=True, layer_idx=i)
        torch.testing.assert_close(sm.fake_quant_seq(x, is_key=True, layer_idx=i), want)
        v = sm.fake_quant_seq(x, is_key=False, layer_idx=i)  # values are not smoothed
        torch.testing.assert_close(v, r.fake_quant_seq(x, is_key=False, layer_idx=i))


def test_key_smoothing_lowers_the_score_error_where_queries_ignore_large_keys():
    # keys: 8 channels (4 rotary pairs' halves) 30x larger than the rest, which queries ignore
    g = torch.Generator().manual_seed(5)
    big = torch.zeros(D, dtype=torch.bool)
    big[:4], big[32:36] = True, True
    k = torch.randn(512, H, D, generator=g) * torch.where(big, 30.0, 1.0)
    q = torch.randn(512, H, D, generator=g) * torch.where(big, 0.02, 1.0)
    names = ("int4-bdr64-kv",) * 4
    r = Recipe(tuple(parse_method(n, D) for n in names), D, H, None)
    s = smoothing_scales(q.pow(2).mean(0).expand(4, H, D), k.pow(2).mean(0).expand(4, H, D))
    sm = Recipe(r.layers, D, H, None, k_scale=s)
    exact = torch.einsum("thd,shd->hts", q, k)

    def err(rec):
        kq = rec.fake_quant_seq(k, is_key=True, layer_idx=0)
        return float((torch.einsum("thd,shd->hts", q, kq) - exact).pow(2).mean())

    assert err(sm) < 0.25 * err(r), (err(sm), err(r))


def test_key_scales_round_trip_and_are_validated(tmp_path):
    r = make_recipe()
    k_scale = torch.rand(len(LAYERS), H, D) + 0.5
    sm = _smoothed(r, k_scale)
    back = Recipe.load(sm.save(tmp_path / "s.safetensors"))
    assert torch.equal(back.k_scale, k_scale) and torch.equal(back.k_means, sm.k_means)
    assert sm.to_json()["key_smoothing"] and not r.to_json()["key_smoothing"]
    assert sm.summary() == r.summary() + "; key smoothing on 5/5 layers"
    one_off = k_scale.clone()
    one_off[2] = 1.0
    assert _smoothed(r, one_off).summary().endswith("on 4/5 layers")
    assert Recipe.load(r.save(tmp_path / "r.safetensors")).k_scale is None
    with pytest.raises(ValueError, match="key scales have shape"):
        Recipe(r.layers, D, H, r.k_means, k_scale=torch.ones(len(LAYERS), H + 1, D))
    with pytest.raises(ValueError, match="finite and > 0"):
        _smoothed(r, torch.zeros(len(LAYERS), H, D))


def test_saw_int4_name_parses_everywhere():
    assert parse_method("saw-int4") is SAW_INT4 and parse_method(" SAW-INT4 ", 64) is SAW_INT4
    assert is_saw_int4("saw-int4") and is_saw_int4(SAW_INT4) and not is_saw_int4("int4")
    assert parse_method(SAW_INT4_FALLBACK, 64).name == "int4-bdr64-kv"
    assert SAW_INT4.bits_per_element(128) == 4.5


def test_serving_imports_load_no_evaluation_baseline():
    code = (
        "import sys, sawkv.quant, sawkv.engine.llm_engine, sawkv.server.cli\n"
        "bad = [m for m in sys.modules if m.split('.')[-1] in "
        "('kivi', 'kmeans', 'hessian', 'mixed', 'baselines', 'sim_cache')]\n"
        "assert not bad, bad\n"
        "from sawkv.quant import parse_method\n"
        "try:\n    parse_method('kivi4')\nexcept ValueError:\n    pass\n"
        "else:\n    raise AssertionError('kivi4 parsed without sawkv.eval')\n"
        "import sawkv.eval\n"
        "assert parse_method('kivi4').name == 'kivi4-g32-r128'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
