"""Llama-family decoder (Llama, Mistral, Qwen2 with qkv bias, Qwen3 with QK-norm).

The three differ only in flags of :class:`ModelConfig` (``attention_bias``, ``qk_norm``), so one
module covers them; parameter names follow HF except the fused ``qkv_proj`` / ``gate_up_proj``.
"""

from __future__ import annotations

import torch
from torch import nn

from sawkv.attention.backend import AttentionBackend, StepContext
from sawkv.config import ModelConfig
from sawkv.models.layers import EAGER_OPS, MLP, Attention, Linear, RMSNorm, RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, backend: AttentionBackend, rope) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, idx, backend, rope)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, ctx: StepContext):
        """-> (x, residual): the residual add is fused into the next norm."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, ctx)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class CausalLM(nn.Module):
    """Decoder stack + LM head. ``forward`` returns hidden states ``[num_tokens, hidden]``;
    :meth:`compute_logits` turns the selected rows into fp32 logits ``[n, vocab]``."""

    layer_cls = DecoderLayer
    norm_offset = 0.0

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_len: int) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        ropes = self.make_ropes(cfg, max_len)
        self.layers = nn.ModuleList(
            self.layer_cls(cfg, i, backend, ropes[cfg.layer_types[i]])
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.norm_offset)
        self.lm_head = None
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.ops = EAGER_OPS

    @staticmethod
    def make_ropes(cfg: ModelConfig, max_len: int) -> dict[str, RotaryEmbedding]:
        full = RotaryEmbedding(cfg.head_dim, max_len, cfg.rope_theta, dict(cfg.rope_scaling))
        if "sliding" not in cfg.layer_types:
            return {"full": full}
        local = RotaryEmbedding(cfg.head_dim, max_len, cfg.rope_local_theta, {})
        return {"full": full, "sliding": local}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, ctx: StepContext) -> torch.Tensor:
        """``input_ids, positions [num_tokens]`` -> hidden ``[num_tokens, hidden_size]``."""
        x, residual = self.embed(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.ops.linear(hidden, weight).float()
