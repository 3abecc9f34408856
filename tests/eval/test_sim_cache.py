"""SimKVCache: token-wise methods agree with the real SawKVCache; KIVI's residual is exact;
chunked reads equal one-shot reads; generate runs through baseline methods."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from sawkv.eval.sim_cache import SimKVCache, build_cache
from sawkv.hf import SawKVCache
from sawkv.quant import parse_method


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def _logits(model, cache, ids):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits


IDS = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["int4", "int4-bdr32-kc", "int2-bdr16-kv"])
def test_token_wise_matches_real_cache(model, name):
    mu = torch.randn(2, 2, 32)
    real = _logits(model, SawKVCache(model, name, k_means=mu), IDS)
    sim = _logits(model, SimKVCache(model, name, k_means=mu), IDS)
    torch.testing.assert_close(sim, real, atol=1e-5, rtol=0)
    assert isinstance(build_cache(model, name, mu), SawKVCache)


def test_kivi_within_residual_is_exact_and_beyond_is_not(model):
    ref = _logits(model, DynamicCache(config=model.config), IDS)
    exact = _logits(model, build_cache(model, "kivi2-g8-r64"), IDS)  # 40 tokens < R
    torch.testing.assert_close(exact, ref, atol=1e-6, rtol=0)
    quant = _logits(model, build_cache(model, "kivi2-g8-r8"), IDS)
    assert (quant - ref).abs().max() > 1e-3


def _mixed(model):
    sens = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    return parse_method("mixed6-s4", 32).fit(sens)


def test_chunked_reads_equal_one_shot(model):
    """Per-token methods: prefill in two chunks gives the same logits as one pass."""
    method, mu = _mixed(model), torch.randn(2, 2, 32)
    full = _logits(model, SimKVCache(model, method, mu), IDS)
    cache = SimKVCache(model, method, mu)
    _logits(model, cache, IDS[:, :24])
    tail = _logits(model, cache, IDS[:, 24:])
    torch.testing.assert_close(tail, full[:, 24:], atol=1e-5, rtol=0)
    assert cache.get_seq_length() == 40


def test_kivi_layer_requantizes_whole_sequence(model):
    """A sequence-dependent layer returns the method applied to everything stored so far."""
    method = parse_method("kivi2-g8-r8")
    layer = SimKVCache(model, method).layers[0]
    k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    layer.update(k[:, :, :20], v[:, :, :20])
    k_out, v_out = layer.update(k[:, :, 20:], v[:, :, 20:])
    ref_k = method.fake_quant_seq(k[0].transpose(0, 1), is_key=True, layer_idx=0)
    ref_v = method.fake_quant_seq(v[0].transpose(0, 1), is_key=False, layer_idx=0)
    torch.testing.assert_close(k_out[0], ref_k.transpose(0, 1))
    torch.testing.assert_close(v_out[0], ref_v.transpose(0, 1))


@pytest.mark.parametrize("name", ["kivi2-g8-r8", "mixed"])
def test_generate_runs(model, name):
    method = _mixed(model) if name == "mixed" else name
    out = model.generate(
        IDS[:, :10],
        past_key_values=SimKVCache(model, method, torch.zeros(2, 2, 32)),
        max_new_tokens=6,
        do_sample=False,
    )
    assert out.shape == (1, 16)


def test_bad_key_means_shape(model):
    with pytest.raises(ValueError, match="k_means has shape"):
        SimKVCache(model, "kivi2", torch.zeros(3, 2, 32))
