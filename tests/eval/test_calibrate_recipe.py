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
    query_positions,
)
from sawkv.eval.recipe_search import (
    KLScorer,
    block_se,
    coordinate_descent,
    local_ranking,
    num_high_layers,
    promote_high,
    recipe_bits,
    search_formats,
    spend_on_high,
    uniform_candidates,
)
from sawkv.hf.cache import SawKVCache, cache_kwargs
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


@pytest.mark.parametrize(
    "name", ["int4", "int4-bdr32-kv-kc", "int8-bdr16-kc", "int4-bdr64", "int4-bdr32-kc-kh"]
)
def test_fake_quant_heads_equals_the_method(name):
    # fp64 input: the butterfly and the matmul rotation agree to ~1e-15, so no code flips; both
    # dequantize in fp32 (~1e-6 apart), while one code step is > 0.1 here
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 33, 64, generator=g, dtype=torch.float64) * 3 + 1
    mu = torch.randn(2, 64, generator=g, dtype=torch.float64)
    m = parse_method(name, 64)
    mean = mu if m.center_k else None
    want = m.fake_quant(x.transpose(0, 1), is_key=True, k_mean=mean).transpose(0, 1)
    got = fake_quant_heads(x, m.bits, m.had_block, mean, m.group_size_for(64, is_key=True))
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-4)


def test_candidates_are_servable_and_complete():
    names = [m.name for m in candidate_formats(64, 4)]
    # none, 16, 32, 64 blocks; -kv only with a block; -kc on and off
    assert len(names) == 2 + 3 * 4 and len(set(names)) == len(names)
    assert {"int4", "int4-kc", "int4-bdr64-kv-kc", "int4-bdr16"} <= set(names)
    assert all(m.is_servable for m in candidate_formats(256, 8))
    # with per-half key metadata: every format also as -kh
    kh = [m.name for m in candidate_formats(64, 4, k_half=True)]
    assert sorted(kh) == sorted(names + [n + "-kh" for n in names])
    assert all(m.is_servable for m in candidate_formats(128, 4, k_half=True))


def test_format_errors_of_k_half_are_those_of_per_half_keys():
    """A -kh format's local error is that of keys quantized per half (values as its base):
    keys whose halves differ 10x in range come back closer, so its error is lower."""
    g = torch.Generator().manual_seed(4)
    s, d = 128, 64
    q = torch.randn(2, s, d, generator=g)
    k = torch.randn(1, s, d, generator=g)
    k[..., 32:] *= 10
    v = torch.randn(1, s, d, generator=g)
    pos = query_positions(s, 16)
    data = [(q[:, pos], k, v, d**-0.5, None, pos)]
    mu = k.mean(dim=1)
    methods = [parse_method(n, d) for n in ("int4-bdr32-kc", "int4-bdr32-kc-kh")]
    errs = format_errors(methods, data, mu)
    kq = fake_quant_heads(k, 4, 32, mu, 32)
    ref = causal_attention(q[:, pos], k, v, d**-0.5, None, pos)
    out = causal_attention(q[:, pos], kq, fake_quant_heads(v, 4, None, None), d**-0.5, None, pos)
    want = float((out - ref).pow(2).sum() / ref.pow(2).sum())
    assert errs["int4-bdr32-kc-kh"] == pytest.approx(want, rel=1e-6)
    assert errs["int4-bdr32-kc-kh"] < errs["int4-bdr32-kc"]


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
    with pytest.raises(ValueError, match="num_alternatives"):
        RecipeConfig(num_alternatives=0)


# ---- the end-to-end search, against brute force on a separable stand-in for the KL ---------
class TableScore:
    """A KL stand-in: the sum over layers of ``cost[layer][format name]`` (separable, so the
    best recipe is known by brute force); counts calls like :class:`KLScorer`."""

    def __init__(self, cost: list[dict[str, float]], noise: float = 0.0):
        self.cost, self.num_calls, self.noise = cost, 0, noise
        self.gen = torch.Generator().manual_seed(8)

    def __call__(self, layers) -> float:
        return float(self.per_token(layers).double().mean())

    def per_token(self, layers) -> torch.Tensor:
        self.num_calls += 1
        kl = sum(c[m.name] for c, m in zip(self.cost, layers))
        return kl + self.noise * torch.randn(4, 64, generator=self.gen, dtype=torch.float64)


def random_tables(num_layers: int, names: list[str], seed: int) -> list[dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    return [dict(zip(names, torch.rand(len(names), generator=g).tolist()))
            for _ in range(num_layers)]  # fmt: skip


@pytest.mark.parametrize("k", [1, 2, 3])
def test_coordinate_descent_finds_the_best_of_each_layers_top_k(k):
    cands = candidate_formats(64, 4)
    names = [m.name for m in cands]
    errors, cost = random_tables(6, names, 4), random_tables(6, names, 5)
    start = [parse_method("int4-bdr64-kv-kc", 64)] * 6
    score = TableScore(cost)
    layers, kl, changes = coordinate_descent(score, start, errors, cands, k)
    for i in range(6):  # brute force: the current format or one of the top-k by local error
        allowed = {m.name for m in local_ranking(errors[i], cands, k)} | {start[i].name}
        want = min(allowed, key=lambda n: cost[i][n])
        assert layers[i].name == want
    assert kl == pytest.approx(score(layers)) and kl <= score(start)
    assert [c["layer"] for c in changes] == [i for i in range(6) if layers[i] != start[i]]


def test_coordinate_descent_keeps_the_start_when_nothing_helps():
    cands = candidate_formats(32, 4)
    names = [m.name for m in cands]
    start = [parse_method("int4-bdr32-kv-kc", 32)] * 4
    cost = [{n: 0.0 if n == start[0].name else 1.0 for n in names} for _ in range(4)]
    score = TableScore(cost)
    layers, kl, changes = coordinate_descent(score, start, random_tables(4, names, 6), cands)
    assert layers == start and kl == 0.0 and changes == []


def test_coordinate_descent_ignores_drops_within_the_noise():
    """Per-token KLs with noise of SE ~0.1 / 16: a true drop of 0.001 is no evidence, one of
    0.2 is."""
    cands = candidate_formats(64, 4)
    names = [m.name for m in cands]
    start = [parse_method("int4-bdr64-kv-kc", 64)] * 2
    errors = [{n: 0.0 if n == "int4-bdr32-kv-kc" else 1.0 for n in names}] * 2
    cost = [{n: 1.0 for n in names} for _ in range(2)]
    cost[0]["int4-bdr32-kv-kc"], cost[1]["int4-bdr32-kv-kc"] = 0.999, 0.8
    score = TableScore(cost, noise=0.1)
    layers, _, changes = coordinate_descent(score, start, errors, cands, 1, min_z=2.0)
    assert [m.name for m in layers] == ["int4-bdr64-kv-kc", "int4-bdr32-kv-kc"]
    assert [c["layer"] for c in changes] == [1] and changes[0]["z"] > 2


def test_block_se_matches_the_textbook_formula():
    g = torch.Generator().manual_seed(9)
    diff = torch.randn(3, 100, generator=g, dtype=torch.float64)
    blocks = torch.stack([diff[w, b * 32 : (b + 1) * 32].mean() for w in range(3)
                          for b in range(3)])  # fmt: skip
    want = (blocks.var(unbiased=True) / len(blocks)).sqrt()
    assert block_se(diff, 32) == pytest.approx(float(want))
    assert block_se(diff[:, :10], 32) == 0.0


def test_promote_high_takes_the_largest_positive_drop_only():
    m4 = parse_method("int4-bdr64-kv-kc", 64)
    m8 = parse_method("int8-bdr64-kv-kc", 64)
    base = {m4.name: 1.0, m8.name: 1.0}
    cost = [dict(base) for _ in range(5)]
    cost[1][m8.name], cost[3][m8.name] = 0.7, 0.5  # drops 0.3 and 0.5
    cost[4][m8.name] = 1.2  # INT8 can hurt (a worse key mean or noise): never promoted
    score = TableScore(cost)
    layers, kl, drops, promoted = promote_high(score, [m4] * 5, 5.0, [1, 3, 4], 1)
    assert promoted == [3] and layers[3] == m8 and kl == pytest.approx(4.5)
    assert drops == pytest.approx({1: 0.3, 3: 0.5, 4: -0.2})
    layers, kl, _, promoted = promote_high(score, [m4] * 5, 5.0, [1, 3, 4], 2)
    assert promoted == [1, 3] and kl == pytest.approx(4.2)
    cost[1][m8.name] = cost[3][m8.name] = 1.1
    layers, kl, _, promoted = promote_high(score, [m4] * 5, 5.0, [1, 3, 4], 1)
    assert promoted == [] and layers == [m4] * 5 and kl == 5.0


# ---- per-half key metadata (-kh) under a budget ---------------------------------------------
KH, BASE = "int4-bdr64-kv-kc-kh", "int4-bdr64-kv-kc"


def kh_tables(num_layers: int, kh_cost: float):
    """Local errors whose two lowest are ``KH`` then ``BASE`` in every layer; KL costs 1 per
    layer for every format but ``BASE`` (0.5) and ``KH`` (``kh_cost``)."""
    names = [m.name for m in candidate_formats(64, 4, k_half=True)]
    errors = [{n: 1.0 for n in names} for _ in range(num_layers)]
    cost = [{n: 1.0 for n in names} for _ in range(num_layers)]
    for e, c in zip(errors, cost):
        e[KH], e[BASE], c[KH], c[BASE] = 0.1, 0.2, kh_cost, 0.5
    return errors, cost


def test_search_picks_k_half_where_the_budget_allows_and_it_is_better():
    """-kh (+0.25 bits per element per layer at d=64, averaged over layers) is taken where it
    lowers the KL and the budget has room: on every layer at 4.75 (the default budget at d=64:
    a uniform -kh start), on as many layers as fit at 4.5 + 2 x 0.25 / 6, on none at plain
    INT4's 4.5 or where it does not lower the KL."""
    cands = candidate_formats(64, 4, k_half=True)
    errors, cost = kh_tables(6, 0.3)
    start, layers, kl_starts, kl, _ = search_formats(TableScore(cost), errors, cands, 64, 4.75)
    assert start == KH and [m.name for m in layers] == [KH] * 6 and kl == pytest.approx(1.8)
    assert recipe_bits(layers, 64) == pytest.approx(4.75)
    budget = 4.5 + 2 * 0.25 / 6
    start, layers, kl_starts, kl, changes = search_formats(TableScore(cost), errors, cands, 64,
                                                           budget)  # fmt: skip
    assert start == BASE and KH not in kl_starts  # a uniform -kh recipe is over this budget
    assert [m.name for m in layers] == [KH, KH] + [BASE] * 4  # the first that fit
    assert recipe_bits(layers, 64) <= budget + 1e-9 and kl == pytest.approx(0.6 + 2.0)
    _, layers, kl_starts, _, _ = search_formats(TableScore(cost), errors, cands, 64, 4.5)
    assert [m.name for m in layers] == [BASE] * 6 and not any("kh" in n for n in kl_starts)
    errors, worse = kh_tables(6, 0.7)  # -kh would raise the KL: not taken, though affordable
    _, layers, kl_starts, _, _ = search_formats(TableScore(worse), errors, cands, 64, 4.75)
    assert [m.name for m in layers] == [BASE] * 6 and KH in kl_starts
    with pytest.raises(ValueError, match="head_dim"):
        coordinate_descent(TableScore(cost), layers, errors, cands, budget=4.75)


@pytest.mark.parametrize("kh_cost, int8_cost, winner", [(0.5, 0.0, "k_half"), (0.98, 0.0, "int8")])
def test_spend_on_high_weighs_k_half_against_int8(kh_cost, int8_cost, winner):
    """16 layers at d=64 and the default budget 4.75: -kh on every layer leaves no bits for an
    INT8 layer, the same layers without -kh leave one. Both are finished and the lower KL
    wins: 16 x kh_cost against 15 x 1 + the INT8 layer's cost."""
    errors, cost = kh_tables(16, kh_cost)
    for c in cost:
        c[BASE] = 1.0
        c["int8-bdr64-kv-kc"] = 1.0
    cost[3]["int8-bdr64-kv-kc"] = int8_cost
    score = TableScore(cost)
    kh = [parse_method(KH, 64)] * 16
    layers, kl, drops, promoted, weighed = spend_on_high(score, kh, score(kh), errors, 64, 4.75,
                                                         num_probed=0)  # fmt: skip
    assert weighed == pytest.approx({"k_half": 16 * kh_cost, "int8": 15 + int8_cost})
    assert kl == pytest.approx(min(weighed.values()))
    if winner == "k_half":
        assert layers == kh and promoted == [] and drops == {}
    else:
        assert promoted == [3] and [m.name for m in layers].count(BASE) == 15
        assert layers[3].name == "int8-bdr64-kv-kc" and len(drops) == 16
    assert recipe_bits(layers, 64) <= 4.75 + 1e-9
    # without -kh layers there is nothing to weigh
    plain = [parse_method(BASE, 64)] * 16
    *_, weighed = spend_on_high(score, plain, score(plain), errors, 64, 4.75)
    assert weighed == {}


def test_uniform_candidates_include_the_previous_default():
    names = [m.name for m in candidate_formats(64, 4)]
    errors = [{n: 1.0 for n in names} for _ in range(3)]
    errors[0]["int4-bdr16-kv"] = 0.1  # lowest mean log error
    got = [m.name for m in uniform_candidates(64, errors, num_top=1)]
    assert got == ["int4-bdr32-kv-kc", "int4-bdr64-kv-kc", "int4-bdr64-kc", "int4-bdr16-kv"]
    assert len(uniform_candidates(256, [{n.replace("64", "256"): 1.0 for n in names}])) >= 4
    # with -kh candidates: their variants too, where the budget affords them
    kh_errors = [{m.name: 1.0 for m in candidate_formats(64, 4, k_half=True)}]
    got = [m.name for m in uniform_candidates(64, kh_errors, num_top=0, budget=4.75)]
    assert got == ["int4-bdr32-kv-kc", "int4-bdr64-kv-kc", "int4-bdr64-kc",
                   "int4-bdr32-kv-kc-kh", "int4-bdr64-kv-kc-kh", "int4-bdr64-kc-kh"]  # fmt: skip
    got = [m.name for m in uniform_candidates(64, kh_errors, num_top=2, budget=4.5)]
    assert not any(n.endswith("-kh") for n in got)


def kl_served(model, windows: torch.Tensor, method) -> float:
    """Mean per-token KL to full precision with K/V in a :class:`SawKVCache` (the served
    numerics), one window at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ref = F.log_softmax(model(w[None]).logits[0].float(), -1)
            out = model(w[None], **cache_kwargs(model, SawKVCache(model, method))).logits[0]
            total += float((ref.exp() * (ref - F.log_softmax(out.float(), -1))).sum())
            count += len(w)
    return total / count


# transformers 5.23 renamed forward's past_key_values to cache (the old name warns): calibration
# must pass whichever name the model takes (cache_kwargs)
NO_RENAME_WARNING = pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")


@NO_RENAME_WARNING
@pytest.mark.parametrize("smooth", [False, True])
def test_kl_scorer_matches_the_served_cache(tiny, smooth):
    model, tok = tiny
    wins = torch.stack([torch.arange(100, 140), torch.arange(900, 940)])
    layers = [parse_method(n, 32) for n in ["int4-bdr32-kv-kc", "int8-bdr16-kc"] * 7]
    layers += [parse_method(n, 32) for n in ["int4-bdr16-kc-kh", "int8-kh"]]  # keys per half
    g = torch.Generator().manual_seed(7)
    means = torch.randn(16, 1, 32, generator=g)
    k_scale = torch.exp(torch.randn(16, 1, 16, generator=g)).repeat(1, 1, 2) if smooth else None
    recipe = Recipe(tuple(layers), 32, 1, k_means=means, k_scale=k_scale)
    score = KLScorer(model, wins, means, k_scale)
    assert score(layers) == pytest.approx(kl_served(model, wins, recipe), rel=1e-3)
    assert score.num_calls == 1
    if smooth:  # the scales reach the served cache: without them the KL is another one
        plain = Recipe(tuple(layers), 32, 1, k_means=means)
        assert abs(kl_served(model, wins, plain) / score(layers) - 1) > 0.05
        assert mean_kls(model, [wins[0]], [layers], means, k_scale=k_scale)[0] == pytest.approx(
            kl_served(model, wins[:1], recipe), rel=1e-3
        )


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


@NO_RENAME_WARNING
def test_calibrate_recipe_end_to_end(tiny, tmp_path, monkeypatch):
    from sawkv.eval.tasks import cached_windows
    from sawkv.models.hub import cache_dir

    model, tok = tiny
    cfg = RecipeConfig(texts=("austen",), tokens_per_text=128, window_len=128, sens_len=48,
                       num_queries=16)  # fmt: skip
    seen = []
    recipe = calibrate_recipe(model, tok, cfg, lambda *a: seen.append(a[0]))
    assert {"capture", "int4", "start", "descent", "int8"} <= set(seen)
    assert recipe.bits_per_element() <= default_budget(32) + 1e-9
    # the promoted layer is the probed one whose INT8 lowered the KL most, if any did (on a
    # random model the INT4 errors of tuned layers may cancel, so INT8 can raise the KL)
    drops = {int(i): d for i, d in recipe.info["kl_drop_int8"].items()}
    errs = recipe.info["int4_attn_error"]
    assert len(drops) == 8 and min(errs[i] for i in drops) >= max(
        e for i, e in enumerate(errs) if i not in drops
    )  # the probed layers are those with the largest INT4 error
    best = max(drops, key=lambda i: drops[i])
    assert recipe.info["int8_layers"] == ([best] if drops[best] > 0 else [])
    names = [m.name for m in recipe.layers]
    assert [i for i, n in enumerate(names) if n.startswith("int8")] == recipe.info["int8_layers"]
    assert recipe.info["kl_recipe"] <= recipe.info["kl_all_int4"]
    # key smoothing: the search starts smoothed iff that lowered the probe's KL, then each
    # layer's flip is kept where it lowered the KL; the scales say which layers ended up on
    kls, k_scale, info = recipe.info["kl_key_smoothing"], recipe.k_scale, recipe.info
    assert set(kls) == {"off", "on"} and "smoothing" in seen
    flipped = {f["layer"] for f in info["smoothing_flips"]}
    start_on = kls["on"] < kls["off"]
    assert info["smoothed_layers"] == [i for i in range(16) if start_on != (i in flipped)]
    assert (k_scale is not None) == bool(info["smoothed_layers"])
    if k_scale is not None:
        torch.testing.assert_close(k_scale[..., :16], k_scale[..., 16:])
        is_one = [bool((k_scale[i] == 1).all()) for i in range(16)]
        assert [i for i in range(16) if not is_one[i]] == info["smoothed_layers"]
    # the sink count is the candidate of lowest KL, and the reported KL is with those sinks
    kl_sinks = {int(n): kl for n, kl in recipe.info["kl_sinks"].items()}
    assert sorted(kl_sinks) == [0, 1, 4] and recipe.num_sink == min(kl_sinks, key=kl_sinks.get)
    assert recipe.info["kl_recipe"] == kl_sinks[recipe.num_sink]
    # -kh keys were candidates (within the budget); where they took the bits of INT8 layers,
    # the recipe is whichever finish had the lower KL
    kh_layers = [i for i, m in enumerate(recipe.layers) if m.k_half_meta]
    assert recipe.info["k_half_layers"] == kh_layers
    weighed = recipe.info["kl_k_half_vs_int8"]
    if weighed:
        assert kl_sinks[0] == min(weighed.values())
        assert bool(kh_layers) == (weighed["k_half"] <= weighed["int8"])
    # never worse on the calibration windows than any uniform recipe it tried
    kl_starts = recipe.info["kl_starts"]
    assert "int4-bdr32-kv-kc" in kl_starts and "local" in kl_starts
    assert recipe.info["kl_all_int4"] <= min(kl_starts.values())
    # the reported KL is what the served cache (SawKVCache, real pages) gives on those windows
    win = cached_windows(tok, "austen", 128, 128, "calib", False)[0]
    sens = torch.stack([win[:48], win[64:112]])  # two chunks spread over the window
    # (the two quantizers round alike to ~5e-8 of KL: with sinks the KL itself is ~7e-6)
    assert kl_served(model, sens, recipe) == pytest.approx(
        recipe.info["kl_recipe"], rel=1e-3, abs=1e-7
    )
    # the KLs it reports are the ones an independent cache sees
    wins = [torch.cat([w[:48] for w in [torch.arange(100, 148)]])]
    kl_rec = mean_kls(model, wins, [list(recipe.layers)], recipe.k_means, k_scale=k_scale)[0]
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
    assert (loaded.k_scale is None) == (k_scale is None)
    ids = torch.arange(200, 240)[None]
    with torch.no_grad():
        a = model(ids, **cache_kwargs(model, SawKVCache(model, recipe))).logits
        b = model(
            ids, **cache_kwargs(model, SawKVCache(model, "saw-int4", model_name=model_dir))
        ).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@NO_RENAME_WARNING
def test_calibrate_recipe_tries_k_half_within_its_budget(tiny):
    """With a budget that affords -kh on every layer (5.5 at d=32) the uniform -kh formats are
    starts; without -kh candidates none is; either recipe stays within its budget."""
    model, tok = tiny
    common = dict(texts=("austen",), tokens_per_text=128, window_len=128, sens_len=48,
                  num_queries=16, budget=5.5, sink_candidates=(0,))  # fmt: skip
    recipe = calibrate_recipe(model, tok, RecipeConfig(**common))
    assert "int4-bdr32-kv-kc-kh" in recipe.info["kl_starts"]
    assert recipe.bits_per_element() <= 5.5 + 1e-9
    plain = calibrate_recipe(model, tok, RecipeConfig(**common, k_half_meta=False))
    assert not any(n.endswith("-kh") for n in plain.info["kl_starts"])
    assert not any(m.k_half_meta for m in plain.layers) and plain.bits_per_element() <= 5.5


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
    path.parent.mkdir(parents=True)  # a lookup does not create the model's cache folder
    save_file({"k_means": means}, str(path))
    ids = torch.arange(300, 340)[None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "using mu = 0" warning
        auto = SawKVCache(model, "int4-bdr32-kc")
    explicit = SawKVCache(model, "int4-bdr32-kc", k_means=means)
    assert torch.equal(auto.layers[3].k_mean, means[3])
    with torch.no_grad():
        a = model(ids, **cache_kwargs(model, auto)).logits
        b = model(ids, **cache_kwargs(model, explicit)).logits
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
