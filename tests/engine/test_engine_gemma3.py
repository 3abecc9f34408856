"""Real Gemma-3-270M (sliding window 512 on 15 of 18 layers, head_dim 256, one KV head):
engine greedy == HF greedy in fp32, with a prompt longer than the window."""

from __future__ import annotations

import pytest

from sawkv import LLM, SamplingParams

pytestmark = pytest.mark.slow
SENTENCE = "The old lighthouse keeper climbed the narrow stairs every evening with a lamp. "


def test_gemma3_greedy_matches_hf_past_the_window():
    from sawkv.models.hub import ModelNotInstalledError, load_hf_model

    try:
        model, tok = load_hf_model("gemma3-270m")
    except ModelNotInstalledError as e:
        pytest.skip(str(e))
    prompts = [SENTENCE * 40, "The capital of France is"]
    llm = LLM("gemma3-270m", "auto", dtype="float32", kv_cache_memory_bytes=64 << 20,
              max_model_len=1024)  # fmt: skip
    assert llm.engine.model_config.sliding_window == 512
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)  # fmt: skip
    for prompt, out in zip(prompts, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()  # BOS included by the tokenizer
        ref = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()
        assert out.token_ids == ref
    assert len(outs[0].prompt_token_ids) > 512
