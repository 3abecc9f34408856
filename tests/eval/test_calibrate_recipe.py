"""saw-int4 calibration: attention oracle, format errors, budget arithmetic, an end-to-end run.

The end-to-end run uses a tiny random-weight Llama (16 layers, so the default budget allows
exactly one INT8 layer) with SmolLM2's tokenizer on the real calibration text: seconds, not
the minutes a real model takes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sawkv.eval.calibrate_recipe import (
    RecipeConfig,
    calibrate_recipe,
    candidate_formats,
    causal_attention,
    fake_quant_heads,
    format_errors,
    mean_kls,
    num_high_layers,
    query_positions,
)
from sawkv.hf.cache import SawKVCache
from sawkv.quant import parse_method
from sawkv.quant.recipe import Recipe, default_budget, plain_int4_bits


def sdpa_reference(q, k, v, scale):
    """torch SDPA with GQA by repeating KV heads: ``[Hq, S, d]``."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale)[0]


def test_causal_attention_matches_sdpa_all_and_sampled_queries():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, 40, 32, generator=g, dtype=torch.float64) for h in (6, 2, 2))
    ref = sdpa_reference(q, k, v, 0.2)
    torch.testing.assert_close(causal_attention(q, k, v, 0.2), ref)
    pos = query_positions(40, 7)
    torch.testing.assert_close(causal_attention(q[:, pos], k, v, 0.2, q_pos=pos), ref[:, pos])


def test_causal_attention_sliding_window_masks_old_keys():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 12, 16, generator=g, dtype=torch.float64) for _ in range(3))
    out = causal_attention(q, k, v, 0.25, window=4)
    # position 9 sees keys 6..9 only: same as attention over that slice alone
    last = sdpa_reference(q[:, 6:10], k[:, 6:10], v[:, 6:10], 0.25)[:, -1]
    torch.testing.assert_close(out[:, 9], last)


def test_query_positions_spread_and_include_the_last():
    pos = query_positions(512, 64)
    assert len(pos) == 64 and pos[-1] == 511 and pos[0] >= 1
    assert torch.all(pos[1:] > pos[:-1])
    assert query_positions(5, 64).tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("name", ["int4", "int4-bdr32-kv-kc", "int8-bdr16-kc", "int4-bdr64"])
def test_fake_quant_heads_equals_the_method(name):
    # fp64 input: the butterfly and the matmul rotation agree to ~1e-15, so no code flips; both
    # dequantize in fp32 (~1e-6 apart), while one code step is > 0.1 here
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 33, 64, generator=g, dtype=torch.float64) * 3 + 1
    mu = torch.randn(2, 64, generator=g, dtype=torch.float64)
    m = parse_method(name, 64)
    mean = mu if m.center_k else None
    want = m.fake_quant(x.transpose(0, 1), is_key=True, k_mean=mean).transpose(0, 1)
    got = fake_quant_heads(x, m.bits, m.had_block, mean)
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-4)


def test_candidates_are_servable_and_complete():
    names = [m.name for m in candidate_formats(64, 4)]
    # none, 16, 32, 64 blocks; -kv only with a block; -kc on and off
    assert len(names) == 2 + 3 * 4 and len(set(names)) == len(names)
    assert {"int4", "int4-kc", "int4-bdr64-kv-kc", "int4-bdr16"} <= set(names)
    assert all(m.is_servable for m in candidate_formats(256, 8))


def test_format_errors_prefer_centering_keys_with_an_offset_channel():
    """Keys with a large constant offset channel (Qwen2-style bias): without centering the
    per-token range is wasted on it, so a -kc format must win; INT8 beats INT4."""
    g = torch.Generator().manual_seed(3)
    s, d = 256, 64
    q = torch.randn(4, s, d, generator=g)
    k = torch.randn(2, s, d, generator=g)
    k[:, :, 5] += 60.0
    v = torch.randn(2, s, d, generator=g)
    pos = query_positions(s, 32)
    data = [(q[:, pos], k, v, d**-0.5, None, pos)]
    mu = k.mean(dim=1)
    cands = candidate_formats(d, 4)
    errs = format_errors(cands, data, mu)
    best = min(cands, key=lambda m: errs[m.name])
    assert best.center_k, errs
    assert errs["int4-kc"] < errs["int4"] / 4
    e8 = format_errors([parse_method(best.name.replace("int4", "int8"), d)], data, mu)
    assert next(iter(e8.values())) < errs[best.name] / 20


def test_num_high_layers_budget_arithmetic():
    # one layer in sixteen: 0.25 extra bits / 4 extra bits per INT8 layer
    for layers, d in [(30, 64), (18, 256), (28, 128), (24, 64), (16, 32)]:
        assert num_high_layers(layers, plain_int4_bits(d), 8 + 32 / d, default_budget(d)) == 1
    assert num_high_layers(15, 4.5, 8.5, 4.75) == 0
    assert num_high_layers(32, 4.5, 8.5, 4.75) == 2
    with pytest.raises(ValueError, match="below"):
        num_high_layers(10, 4.5, 8.5, 4.4)


def test_config_validation():
    with pytest.raises(ValueError, match="sens_len"):
        RecipeConfig(window_len=64, tokens_per_text=64, sens_len=65)
    with pytest.raises(ValueError, match="budget"):
        RecipeConfig(budget=3.0)
    with pytest.raises(ValueError, match="at least one text"):
        RecipeConfig(texts=())


@pytest.fixture(scope="module")
def tiny():
    """16-layer random Llama, head_dim 32, with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sawkv.models.hub import ModelNotInstalledError, resolve_model_dir

    try:
        tok = AutoTokenizer.from_pretrained(str(resolve_model_dir("smollm2-135m")))
    except ModelNotInstalledError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=16, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=32, max_position_embeddings=256)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a few large key channels, so formats differ between layers
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias = None
            layer.self_attn.k_proj.weight[:4] *= 8
    return model, tok


def test_calibrate_recipe_end_to_end(tiny, tmp_path, monkeypatch):
    from sawkv.models.hub import cache_dir

    model, tok = tiny
    cfg = RecipeConfig(texts=("austen",), tokens_per_text=128, window_len=128, sens_len=48,
                       num_queries=16)  # fmt: skip
    seen = []
    recipe = calibrate_recipe(model, tok, cfg, lambda *a: seen.append(a[0]))
    assert {"capture", "int4", "sensitivity"} <= set(seen)
    assert recipe.bits_per_element() <= default_budget(32) + 1e-9
    names = [m.name for m in recipe.layers]
    assert sum(n.startswith("int8") for n in names) == 1
    # the promoted layer is the one whose INT8 lowered the KL most, and each INT4 layer the
    # lowest-error candidate
    drops = {int(i): d for i, d in recipe.info["kl_drop_int8"].items()}
    errs = recipe.info["int4_attn_error"]
    assert len(drops) == 8 and min(errs[i] for i in drops) >= max(
        e for i, e in enumerate(errs) if i not in drops
    )  # the probed layers are those with the largest INT4 error
    assert recipe.info["int8_layers"] == [max(drops, key=lambda i: drops[i])]
    assert recipe.info["kl_recipe"] <= recipe.info["kl_all_int4"]
    # the KLs it reports are the ones an independent cache sees
    wins = [torch.cat([w[:48] for w in [torch.arange(100, 148)]])]
    kl_rec = mean_kls(model, wins, [list(recipe.layers)], recipe.k_means)[0]
    kl_int4 = mean_kls(model, wins, [[parse_method("int4", 32)] * 16], recipe.k_means)[0]
    assert kl_rec < kl_int4

    # stored beside the model's other artifacts; SawKVCache finds it by the model's name
    real = cache_dir()
    for sub in ("data", "pkgs"):
        (tmp_path / sub).symlink_to(real / sub)
    monkeypatch.setenv("SAWKV_CACHE", str(tmp_path))
    from sawkv.models.calibration import load_recipe, recipe_path

    model_dir = tmp_path / "tiny-model"
    recipe.save(recipe_path(str(model_dir)))
    loaded = load_recipe(str(model_dir))
    assert isinstance(loaded, Recipe) and loaded == recipe
    ids = torch.arange(200, 240)[None]
    with torch.no_grad():
        a = model(ids, past_key_values=SawKVCache(model, recipe)).logits
        b = model(ids, past_key_values=SawKVCache(model, "saw-int4", model_name=model_dir)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sawkvcache_loads_the_models_key_means_by_itself(tiny, tmp_path, monkeypatch):
    """``SawKVCache(model, "...-kc")`` of a known model uses its calibrated means (it used to
    warn and use mu = 0)."""
    import warnings

    from sawkv.models.calibration import key_means_path
    from sawkv.models.hub import cache_dir

    model, _ = tiny
    real = cache_dir()
    (tmp_path / "data").symlink_to(real / "data")
    monkeypatch.setenv("SAWKV_CACHE", str(tmp_path))
    model_dir = tmp_path / "tiny-model"
    monkeypatch.setattr(model.config, "_name_or_path", str(model_dir))
    from safetensors.torch import save_file

    means = torch.randn(16, 1, 32) * 4
    path = key_means_path(str(model_dir))
    save_file({"k_means": means}, str(path))
    ids = torch.arange(300, 340)[None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "using mu = 0" warning
        auto = SawKVCache(model, "int4-bdr32-kc")
    explicit = SawKVCache(model, "int4-bdr32-kc", k_means=means)
    assert torch.equal(auto.layers[3].k_mean, means[3])
    with torch.no_grad():
        a = model(ids, past_key_values=auto).logits
        b = model(ids, past_key_values=explicit).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    path.unlink()
    with pytest.warns(UserWarning, match="mu = 0"):
        SawKVCache(model, "int4-bdr32-kc")


def test_method_protocol_is_declared_by_every_sequence_method():
    import sawkv.eval  # noqa: F401  registers the baselines
    from sawkv.eval.sim_cache import TokenWise
    from sawkv.quant.protocol import SeqMethod

    methods = [parse_method(n, 64) for n in ("kivi4", "kmeans4-d2", "gptq4-bdr-kc", "mixed4.5")]
    methods += [TokenWise(parse_method("int4-bdr64", 64))]
    methods += [Recipe((parse_method("int4", 64),), 64, 1)]
    for m in methods:
        assert isinstance(m, SeqMethod), m
    assert not isinstance(parse_method("int4", 64), SeqMethod)  # KVMethod: encode/decode
