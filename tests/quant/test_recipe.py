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
)

D, H = 64, 2
LAYERS = ("int4-bdr64-kv-kc", "int8-bdr32-kc", "int4-bdr16", "int4")


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
    by_hand = [(4 * D + 32) / D, (8 * D + 32) / D, (4 * D + 32) / D, (4 * D + 32) / D]
    assert r.bits_per_element() == pytest.approx(sum(by_hand) / 4)
    assert r.counts() == {"int4-bdr64-kv-kc": 1, "int8-bdr32-kc": 1, "int4-bdr16": 1, "int4": 1}
    assert r.summary() == "0 int4-bdr64-kv-kc; 1 int8-bdr32-kc; 2 int4-bdr16; 3 int4"


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
        make_recipe(budget=4.75)  # one INT8 layer in four costs 4.5 + 1 = 5.5
    with pytest.raises(ValueError, match="no key means"):
        Recipe((parse_method("int4-kc", D),), D, H, None)
    with pytest.raises(ValueError, match="shape"):
        Recipe((parse_method("int4-kc", D),), D, H, torch.zeros(2, H, D))
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"k_means": torch.zeros(1)}, str(bad), metadata={"recipe": "{}"})
    with pytest.raises(ValueError, match="malformed saw-int4 recipe"):
        Recipe.load(bad)


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
