"""Tiny random-weight models for the HF cache tests (build in milliseconds, no files needed)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def tiny_llama(head_dim: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    """head_dim 128 with a qkv bias: keys carry big offsets in a few low-frequency RoPE channels
    (the last ones of each rotary half, which barely rotate over short spans), as in Qwen2.x."""
    torch.manual_seed(1)
    cfg = Qwen2Config(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.self_attn.k_proj.bias.view(-1, 128)
            bias[:, 56:64].normal_(0, 8.0)
            bias[:, 120:128].normal_(0, 8.0)
    return model


@pytest.fixture(scope="module")
def llama64():
    return tiny_llama(64)


@pytest.fixture(scope="module")
def qwen128():
    return tiny_qwen2()
