"""Each architecture against HF transformers on tiny random models (fp32, greedy, token for token).

Tiny configs exercise what distinguishes the families: Qwen2's qkv bias, Qwen3's QK-norm,
Llama-3.1's RoPE scaling and GQA, Gemma3's sandwich norms, scaled embeddings and sliding-window
layers (window 6 < prompt length, so the window is really in play). Weights are random with a
large init so greedy outputs vary from token to token.
"""

from __future__ import annotations

import pytest
import torch

from sawkv import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.15,
    tie_word_embeddings=False,
)


def tiny_config(arch: str):
    if arch == "llama":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 5e5,
        }
        return transformers.LlamaConfig(**COMMON, rope_parameters=rope)
    if arch == "qwen2":
        return transformers.Qwen2Config(**COMMON)
    if arch == "qwen3":
        return transformers.Qwen3Config(**COMMON, attention_bias=False)
    if arch == "gemma3":
        kw = {**COMMON, "tie_word_embeddings": True}
        return transformers.Gemma3TextConfig(
            **kw,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
        )
    raise AssertionError(arch)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "gemma3"])
def tiny_model(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config(request.param)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    norm_center = 0.0 if request.param == "gemma3" else 1.0  # Gemma stores norms as w - 1
    with torch.no_grad():  # HF inits biases and norms to constants: make them matter
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0.0, 0.3)
            elif "norm" in name:
                p.normal_(norm_center, 0.1)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


PROMPTS = [[5, 17, 3, 99, 42, 8, 11, 60, 7, 1, 2, 70], [9, 9, 4], [100, 3, 55, 21, 13, 8, 88]]


def test_greedy_matches_transformers(tiny_model):
    arch, model, path = tiny_model
    llm = LLM(str(path), "auto", dtype="float32", block_size=4, kv_cache_memory_bytes=1 << 20)
    outs = llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False
    )
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([prompt])
        ref = model.generate(
            ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert out.token_ids == ref, arch
    assert len({t for o in outs for t in o.token_ids}) > 3  # outputs are not degenerate
