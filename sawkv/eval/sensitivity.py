"""Per-(layer, KV head) sensitivity of a model to KV quantization.

For every unit (layer l, KV head h) the model is run on calibration windows with *only* that
head's K and V quantized by a token-wise method (the low level of a mixed-precision scheme,
e.g. ``int4-bdr64-kc``), everything else in full precision, and the sensitivity is the mean
per-token KL divergence ``KL(p_full || p_unit)`` of the next-token distributions. The result
``[num_layers, num_kv_heads]`` drives :class:`sawkv.quant.mixed.MixedMethod` and the heatmap
of the report. Cost: one forward per unit and window (``num_layers * num_kv_heads`` forwards).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from sawkv.eval.sim_cache import SimKVCache
from sawkv.hf.cache import attention_shape, cache_kwargs
from sawkv.quant.methods import KVMethod


class HeadProbe:
    """Quantizes only (``layer``, ``head``) with a token-wise method; everything else exact."""

    seq_dependent = False
    is_servable = False
    token_wise = False

    def __init__(self, method: KVMethod, layer: int, head: int):
        self.method, self.layer, self.head = method, layer, head
        self.name = f"probe[{method.name}@{layer}.{head}]"

    def resolve(self, head_dim: int) -> HeadProbe:
        self.method = self.method.resolve(head_dim)
        return self

    def bits_per_element(self, head_dim: int) -> float:
        return self.method.bits_per_element(head_dim)

    def fake_quant_seq(self, x, *, is_key: bool, layer_idx: int, k_mean=None, start: int = 0):
        """``x [seq, H, d]``: head ``self.head`` of layer ``self.layer`` quantized, rest as is."""
        if layer_idx != self.layer:
            return x
        h = self.head
        mu = None if k_mean is None else k_mean[h : h + 1]
        y = x.clone()
        y[:, h : h + 1] = self.method.fake_quant(x[:, h : h + 1], is_key=is_key, k_mean=mu)
        return y


def kl_per_token(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(ref) || softmax(logits))`` per position: ``[..., V]`` -> ``[...]``."""
    lp_ref = F.log_softmax(ref_logits.float(), -1)
    lp = F.log_softmax(logits.float(), -1)
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1)


@torch.no_grad()
def sensitivity_profile(
    model,
    windows: torch.Tensor,
    method: KVMethod,
    k_means: torch.Tensor | None = None,
    progress=None,
) -> torch.Tensor:
    """Mean per-token KL to full precision with one (layer, KV head) quantized at a time.

    Args:
        model: a transformers causal LM.
        windows: ``[num_windows, window_len]`` calibration token ids.
        method: resolved token-wise :class:`KVMethod` applied to the probed head.
        k_means: ``[num_layers, num_kv_heads, head_dim]`` key means (``-kc``) or None.
        progress: optional callable ``(done, total)``.
    Returns:
        ``[num_layers, num_kv_heads]`` fp32 sensitivities (nats per token).
    """
    num_layers, num_kv_heads, head_dim = attention_shape(model.config)
    device = next(model.parameters()).device
    method = method.resolve(head_dim)
    out = torch.zeros(num_layers, num_kv_heads)
    total = num_layers * num_kv_heads * len(windows)
    done = 0
    for w in windows:
        ids = w[None].to(device)
        plain = Cache(layers=[DynamicLayer() for _ in range(num_layers)])
        ref = model(ids, **cache_kwargs(model, plain), use_cache=True).logits[0]
        for layer in range(num_layers):
            for head in range(num_kv_heads):
                cache = SimKVCache(model, HeadProbe(method, layer, head), k_means)
                logits = model(ids, **cache_kwargs(model, cache), use_cache=True).logits[0]
                out[layer, head] += kl_per_token(ref, logits).mean().item() / len(windows)
                done += 1
                if progress is not None:
                    progress(done, total)
    return out
