"""The engine keeping a recipe's attention sinks exact (SmolLM2-135M, CPU, torch backend).

References: HF transformers reading the same recipe through :class:`sawkv.hf.SawKVCache`
(sinks kept in the model dtype by a different code path); the same engine without
preemption or prefix caching, token for token.
"""

from __future__ import annotations

import pytest
import torch
from test_engine_recipe import (  # noqa: F401  (fixture)
    MODEL,
    PROMPTS,
    TEXT,
    _engine_logprobs,
    hf_logprobs_of,
    kl,
    make_llm,
    make_recipe,
    private_cache,
    store,
)

from sawkv import SamplingParams
from sawkv.quant.recipe import Recipe

pytestmark = pytest.mark.slow
FORMATS = ["int4-bdr64-kv-kc", "int4-bdr16", "int8-bdr32-kc"]


def with_sinks(recipe: Recipe, n: int) -> Recipe:
    return Recipe(recipe.layers, recipe.head_dim, recipe.num_kv_heads, recipe.k_means,
                  num_sink=n)  # fmt: skip


@pytest.fixture(scope="module")
def sink_llm(private_cache):  # noqa: F811
    recipe = with_sinks(make_recipe(FORMATS), 4)
    store(recipe)
    return make_llm("saw-int4"), recipe


def test_sink_stores_are_allocated_and_counted(sink_llm):
    llm, recipe = sink_llm
    runner, bm = llm.engine.runner, llm.engine.block_manager
    assert llm.engine.spec.num_sink == 4
    assert runner.num_first_blocks == bm.num_first_blocks > 0
    shape = (runner.num_first_blocks, 4, 3, 64)
    assert all(kv.sinks is not None and tuple(kv.sinks.k.shape) == shape for kv in runner.kv)
    sink_bytes = llm.engine.spec.sink_bytes(runner.num_first_blocks)
    assert sink_bytes == 30 * 2 * shape[0] * 4 * 3 * 64 * 4  # layers, K+V, fp32
    assert bm.num_blocks == ((32 << 20) - sink_bytes) // llm.engine.spec.bytes_per_block


def test_engine_sinks_match_hf_with_the_same_recipe(sink_llm):
    from sawkv.models.hub import load_hf_model

    llm, recipe = sink_llm
    model, tok = load_hf_model(MODEL)
    ids = torch.tensor([tok.encode(TEXT)])
    lp = _engine_logprobs(llm, ids[0].tolist())
    lp_hf = hf_logprobs_of(model, ids, recipe)  # the recipe's own sinks
    lp_nosink = hf_logprobs_of(model, ids, recipe, num_sink=0)
    # the same recipe without its sinks is measurably further from the engine than HF with them
    assert kl(lp_hf, lp) < 0.5 * kl(lp_nosink, lp), (kl(lp_hf, lp), kl(lp_nosink, lp))


def test_sinks_under_preemption_and_prefix_caching(sink_llm):
    llm, _ = sink_llm
    longer = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(PROMPTS, longer, use_tqdm=False)]
    # 8 pages: 2 first pages (sink rows), 6 others; each sequence needs 4 others by its end,
    # so the second running sequence is preempted and recomputed
    small = make_llm("saw-int4", num_gpu_blocks=8, max_model_len=80)
    assert small.engine.block_manager.num_first_blocks == 2
    assert [o.token_ids for o in small.generate(PROMPTS, longer, use_tqdm=False)] == expected
    assert small.engine.stats()["num_preemptions"] > 0
    shared = "Answer briefly and precisely, in simple words, and never make things up. " * 3
    prompts = [shared + q for q in ("Name a fruit.", "Why is the sky blue?")]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = make_llm("saw-int4", enable_prefix_caching=False)
    want = [plain.generate([p], greedy, use_tqdm=False)[0].token_ids for p in prompts]
    cached = make_llm("saw-int4")
    got = [cached.generate([p], greedy, use_tqdm=False)[0].token_ids for p in prompts]
    assert got == want and cached.engine.stats()["prefix_cache_hit_tokens"] >= 32
