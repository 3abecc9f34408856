"""The engine serving ``saw-int4``: per-layer page formats (SmolLM2-135M, CPU, torch backend).

A hand-made recipe is stored in a private cache, so these tests do not depend on (or write)
the user's calibration. References: a uniform recipe must equal the uniform method token for
token; a mixed recipe's pages must have each layer's own shape and the pool must be sized by
their real bytes; its next-token distributions must match HF transformers reading the same
recipe through :class:`sawkv.hf.SawKVCache` (same quantization, different code path).
"""

from __future__ import annotations

import pytest
import torch

from sawkv import LLM, SamplingParams
from sawkv.quant import parse_method
from sawkv.quant.recipe import Recipe

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
L, H, D = 30, 3, 64
PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
MIXED = ["int4-bdr64-kv-kc", "int8-bdr32-kc", "int4-bdr16", "int4-kc", "int8", "int4-bdr64-kv",
         "int4-bdr64-kv-kc-kh"]  # fmt: skip


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """A SAWKV_CACHE that sees the installed models and texts but has its own artifacts."""
    from sawkv.models.hub import ModelNotInstalledError, cache_dir, resolve_model_dir

    try:
        resolve_model_dir(MODEL)
    except ModelNotInstalledError as e:
        pytest.skip(str(e))
    real, tmp = cache_dir(), tmp_path_factory.mktemp("cache")
    for sub in ("data", "pkgs", "models", "gguf"):
        if (real / sub).exists():
            (tmp / sub).symlink_to(real / sub)
    mp = pytest.MonkeyPatch()
    mp.setenv("SAWKV_CACHE", str(tmp))
    yield tmp
    mp.undo()


def store(recipe: Recipe) -> None:
    from sawkv.models.calibration import recipe_path

    recipe.save(recipe_path(MODEL))


def make_recipe(names: list[str]) -> Recipe:
    g = torch.Generator().manual_seed(0)
    layers = tuple(parse_method(names[i % len(names)], D) for i in range(L))
    means = torch.randn(L, H, D, generator=g) * 0.5
    return Recipe(layers, D, H, means if any(m.center_k for m in layers) else None)


def make_llm(kv, **kw):
    kw.setdefault("kv_cache_memory_bytes", 32 << 20)
    kw.setdefault("max_model_len", 256)
    return LLM(MODEL, kv, dtype="float32", **kw)


def test_uniform_recipe_equals_the_uniform_method(private_cache):
    store(make_recipe(["int4-bdr64"]))
    rec = make_llm("saw-int4")
    ref = make_llm("int4-bdr64")
    assert rec.engine.spec.method.name == "saw-int4"
    assert rec.engine.spec.bytes_per_block == ref.engine.spec.bytes_per_block
    assert rec.engine.block_manager.num_blocks == ref.engine.block_manager.num_blocks
    got = [o.token_ids for o in rec.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert got == [o.token_ids for o in ref.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def mixed_llm(private_cache):
    recipe = make_recipe(MIXED)
    store(recipe)
    return make_llm("saw-int4"), recipe


def test_mixed_pages_have_each_layers_format_and_real_size(mixed_llm):
    llm, recipe = mixed_llm
    runner = llm.engine.runner
    per_block = 0
    for i, kv in enumerate(runner.kv):
        m = recipe.layers[i]
        assert kv.pages.k_cache.shape[-1] == (D // 2 if m.bits == 4 else D)
        assert kv.pages.k_cache.dtype == torch.uint8 and kv.pages.k_meta is not None
        assert (kv.k_mean is not None) == m.center_k
        assert runner.model.layers[i].self_attn.kv is kv
        assert (kv.fmt.bits, kv.fmt.had_block, kv.fmt.rotate_v, kv.fmt.k_half_meta) == (
            m.bits,
            m.had_block or 0,
            m.rotate_v,
            m.k_half_meta,
        )
        # -kh layers: (scale_lo, min_lo, scale_hi, min_hi) per key, one pair per value
        assert kv.pages.k_meta.shape[-1] == (4 if m.k_half_meta else 2)
        assert kv.pages.v_meta.shape[-1] == 2
        tensors = kv.pages
        per_block += sum(t[0].numel() * t.element_size() for t in tensors)
    assert llm.engine.spec.bytes_per_block == per_block
    assert llm.engine.block_manager.num_blocks == (32 << 20) // per_block
    # the memory report counts the recipe's average bits
    assert llm.engine.spec.method.bits_per_element(D) == pytest.approx(recipe.bits_per_element())


def test_mixed_recipe_matches_hf_with_the_same_recipe(mixed_llm):
    from sawkv.models.hub import load_hf_model

    llm, recipe = mixed_llm
    model, tok = load_hf_model(MODEL)
    ids = torch.tensor([tok.encode(TEXT)])

    def hf_logprobs(method):
        return hf_logprobs_of(model, ids, method)

    lp = _engine_logprobs(llm, ids[0].tolist())
    lp_hf, lp_full = hf_logprobs(recipe), hf_logprobs(None)
    kl_paths, kl_quant = kl(lp_hf, lp), kl(lp_full, lp_hf)
    # The two code paths differ by float rounding: a code at a rounding boundary can flip
    # (measured: KL 6e-4 for int4-bdr64, 8e-3 for int4-bdr16, against 5e-2 / 7e-2 of
    # quantization itself). A layer served in the wrong format, or without its mean, moves
    # the distribution as far as quantization does.
    assert kl_paths < 0.5 * kl_quant, (kl_paths, kl_quant)
    for name in sorted(set(MIXED)):  # the recipe, not any one of its formats, is served
        recipe_one = make_recipe([name])
        if recipe_one.k_means is not None:
            recipe_one = Recipe(recipe_one.layers, D, H, recipe.k_means)
        assert kl_paths < 0.5 * kl(hf_logprobs(recipe_one), lp), name


TEXT = (
    "The old lighthouse keeper climbed the narrow stairs every evening, carrying a lamp "
    "and a small notebook in which he wrote the color of the sea and the names of ships."
)


def hf_logprobs_of(model, ids, method, **cache_kw):
    """HF transformers' next-token log-probs of ``ids [1, T]`` reading K/V through
    ``SawKVCache(model, method, **cache_kw)`` (full precision for ``method=None``)."""
    from sawkv.hf.cache import SawKVCache

    with torch.no_grad():
        cache = None if method is None else SawKVCache(model, method, **cache_kw)
        return model(ids, past_key_values=cache).logits[0].log_softmax(-1)


def kl(p, q):
    """Mean per-token KL(p || q) of log-prob rows."""
    return (p.exp() * (p - q)).sum(-1).mean().item()


def _engine_logprobs(llm, ids):
    from sawkv.engine.scheduler import ScheduledBatch
    from sawkv.engine.sequence import Sequence

    eng = llm.engine
    seq = Sequence("score", ids, SamplingParams())
    assert eng.block_manager.ensure_slots(seq, len(ids))
    with torch.inference_mode():
        inp, pos, ctx, _, _ = eng.runner.prepare(ScheduledBatch([seq], [len(ids)]))
        logits = eng.runner.model.compute_logits(eng.runner.model(inp, pos, ctx))
    eng.block_manager.free(seq)
    return logits.log_softmax(-1)


def test_k_half_meta_is_served_as_hf_reads_it(private_cache):
    """``-kh`` through the engine's pages (``k_meta [..., 4]``, written and read per half)
    against HF reading the same method through SawKVCache: the two paths agree far better than
    either agrees with keys quantized per row (what serving ``-kh`` pages as plain ones would
    give), and the pool is sized by the larger pages."""
    from sawkv.models.hub import load_hf_model

    llm = make_llm("int4-bdr64-kv-kh")
    plain = make_llm("int4-bdr64-kv")
    assert llm.engine.runner.kv[0].fmt.k_half_meta
    # 2 more fp16 per key: (32 + 8 + 32 + 4) vs (32 + 4) * 2 bytes per token and head
    assert llm.engine.spec.bytes_per_block * 72 == plain.engine.spec.bytes_per_block * 76
    model, tok = load_hf_model(MODEL)
    ids = torch.tensor([tok.encode(TEXT)])
    lp = _engine_logprobs(llm, ids[0].tolist())
    kl_paths = kl(hf_logprobs_of(model, ids, "int4-bdr64-kv-kh"), lp)
    kl_rows = kl(hf_logprobs_of(model, ids, "int4-bdr64-kv"), lp)
    assert kl_paths < 0.5 * kl_rows, (kl_paths, kl_rows)


def test_mixed_recipe_under_preemption_and_prefix_caching(mixed_llm):
    llm, _ = mixed_llm
    longer = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(PROMPTS, longer, use_tqdm=False)]
    # 3 pages of 16 tokens: each prompt takes one, each sequence needs a second one at its
    # 17th token, so sequences are preempted and recomputed
    small = make_llm("saw-int4", num_gpu_blocks=3, max_model_len=48)
    assert [o.token_ids for o in small.generate(PROMPTS, longer, use_tqdm=False)] == expected
    assert small.engine.stats()["num_preemptions"] > 0
    shared = "Answer briefly and precisely, in simple words, and never make things up. " * 3
    prompts = [shared + q for q in ("Name a fruit.", "Why is the sky blue?")]
    # same order and batching; only the reuse of the shared pages differs
    plain = make_llm("saw-int4", enable_prefix_caching=False)
    want = [plain.generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in prompts]
    cached = make_llm("saw-int4")
    got = [cached.generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in prompts]
    assert got == want and cached.engine.stats()["prefix_cache_hit_tokens"] >= 32


def test_dummy_weights_use_the_documented_fallback(private_cache):
    from sawkv.quant.recipe import SAW_INT4_FALLBACK

    llm = LLM(MODEL, "saw-int4", load_format="dummy", dtype="float32", max_model_len=64,
              kv_cache_memory_bytes=8 << 20)  # fmt: skip
    assert llm.engine.spec.method == parse_method(SAW_INT4_FALLBACK, D)


def test_key_smoothing_is_served_like_hf_reads_it(private_cache):
    """A recipe with key smoothing: the engine's queries and keys are scaled in the model, the
    pages hold ``k / s``; HF reads the same recipe through SawKVCache, which scales inside the
    cache. Both must agree, and differ from the same recipe without its scales."""
    from sawkv.models.hub import load_hf_model

    base = make_recipe(MIXED)
    g = torch.Generator().manual_seed(1)
    k_scale = torch.exp(0.3 * torch.randn(L, H, D // 2, generator=g)).repeat(1, 1, 2)
    smooth = Recipe(base.layers, D, H, base.k_means / k_scale, k_scale=k_scale)
    store(smooth)
    llm = make_llm("saw-int4")
    attn = llm.engine.runner.model.layers[3].self_attn
    torch.testing.assert_close(attn.k_mul, 1 / k_scale[3])
    model, tok = load_hf_model(MODEL)
    ids = torch.tensor([tok.encode(TEXT)])
    lp = _engine_logprobs(llm, ids[0].tolist())
    lp_hf, lp_full = hf_logprobs_of(model, ids, smooth), hf_logprobs_of(model, ids, None)
    unsmoothed = Recipe(base.layers, D, H, base.k_means / k_scale)  # same means, no scales
    kl_paths = kl(lp_hf, lp)
    assert kl_paths < 0.5 * kl(lp_full, lp_hf), kl_paths
    assert kl_paths < 0.5 * kl(hf_logprobs_of(model, ids, unsmoothed), lp), kl_paths
