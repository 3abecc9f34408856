"""Gemma3 text decoder: sandwich norms (pre/post attention and MLP), ``(1 + w)`` RMSNorm,
GELU-tanh MLP, QK-norm, embeddings scaled by sqrt(hidden), and sliding-window layers.

Sliding window is page-based in the sense that the attention kernels mask positions older
than the window inside the block tables; pages that fall out of the window are kept (not
freed) until the sequence ends, so memory is that of full attention.
"""

from __future__ import annotations

import torch
from torch import nn

from sawkv.attention.backend import AttentionBackend, StepContext
from sawkv.config import ModelConfig
from sawkv.models.layers import MLP, Attention, RMSNorm
from sawkv.models.llama import CausalLM


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, backend: AttentionBackend, rope) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, idx, backend, rope)
        self.mlp = MLP(h, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(h, eps, 1.0)
        self.post_attention_layernorm = RMSNorm(h, eps, 1.0)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, 1.0)
        self.post_feedforward_layernorm = RMSNorm(h, eps, 1.0)

    def forward(self, positions, x, residual, ctx: StepContext):
        """Sandwich norms leave nothing to fuse across layers: residual is always None."""
        a = self.self_attn(positions, self.input_layernorm(x), ctx)
        x = x + self.post_attention_layernorm(a)
        m = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(m), None


class Gemma3CausalLM(CausalLM):
    layer_cls = Gemma3DecoderLayer
    norm_offset = 1.0

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # HF rounds the normalizer to the activation dtype before multiplying
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
