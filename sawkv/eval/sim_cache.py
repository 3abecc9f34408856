"""An evaluation-only transformers cache for methods that are not simple token-wise encoders.

KIVI (per-channel key groups), k-means codebooks, GPTQ and per-head mixed precision need the
layer index, calibrated artifacts, or the whole sequence; they expose
``fake_quant_seq(x, *, is_key, layer_idx, k_mean=None, start=0)`` with ``x [seq, H, d]``.
:class:`SimKVCache` keeps what each layer needs and hands attention, on every read, the
method's reconstruction of the whole stored sequence -- prefill included, as for the real cache:

* ``seq_dependent`` methods (KIVI): full-precision K/V are kept and the whole sequence is
  re-quantized at every read (a key group's range, and the residual window, depend on the
  length), which is what KIVI's cache holds after it flushes full groups;
* the others encode each token once, when it arrives (``start`` = its position, for sinks),
  and keep the reconstruction.

It simulates storage (fake-quant): bits per element come from the method's layout. Token-wise
:class:`~sawkv.quant.methods.KVMethod` s are better scored with :class:`sawkv.hf.SawKVCache`,
which really stores their bytes; :func:`build_cache` picks the right one.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from sawkv.hf.cache import SawKVCache, attention_shape
from sawkv.quant.methods import KVMethod, parse_method
from sawkv.quant.recipe import Recipe, is_saw_int4


class TokenWise:
    """Adapter giving a token-wise :class:`KVMethod` the ``fake_quant_seq`` protocol."""

    seq_dependent = False
    is_servable = True
    token_wise = True

    def __init__(self, method: KVMethod):
        self.method = method
        self.name = method.name

    def resolve(self, head_dim: int) -> TokenWise:
        return TokenWise(self.method.resolve(head_dim))

    def bits_per_element(self, head_dim: int) -> float:
        return self.method.bits_per_element(head_dim)

    def fake_quant_seq(self, x, *, is_key: bool, layer_idx: int = 0, k_mean=None, start: int = 0):
        return self.method.fake_quant(x, is_key=is_key, k_mean=k_mean)


def as_seq_method(method, head_dim: int):
    """Name / KVMethod / baseline -> a resolved object with ``fake_quant_seq``."""
    if isinstance(method, str):
        method = parse_method(method)
    method = method.resolve(head_dim)
    return TokenWise(method) if isinstance(method, KVMethod) else method


class SimKVLayer(DynamicLayer):
    """One layer: stores what ``method`` needs, returns its reconstruction of all K/V."""

    def __init__(self, method, layer_idx: int, k_mean: torch.Tensor | None = None):
        super().__init__()
        self.method = method
        self.layer_idx = layer_idx
        self.k_mean = k_mean
        self.cumulative_length = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def _fq(self, x: torch.Tensor, is_key: bool, start: int) -> torch.Tensor:
        """``[B, H, S, D]`` -> the method's reconstruction, one sequence at a time."""
        mu = None if self.k_mean is None else self.k_mean.to(x.device)
        outs = [
            self.method.fake_quant_seq(
                xb.transpose(0, 1),
                is_key=is_key,
                layer_idx=self.layer_idx,
                k_mean=mu,
                start=start,
            ).transpose(0, 1)
            for xb in x
        ]
        return torch.stack(outs).to(x.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new ``[B, H, S, D]`` K/V; return the reconstruction of all stored K/V."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.cumulative_length
        self.cumulative_length += key_states.shape[-2]
        if self.method.seq_dependent:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            return self._fq(self.keys, True, 0), self._fq(self.values, False, 0)
        k = self._fq(key_states, True, start)
        v = self._fq(value_states, False, start)
        self.keys = torch.cat([self.keys, k], dim=-2)
        self.values = torch.cat([self.values, v], dim=-2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.cumulative_length = self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0


class SimKVCache(Cache):
    """Fake-quant cache for any method with ``fake_quant_seq``.

    Args:
        model_config_or_model: a transformers model or its config.
        method: a method name, a :class:`KVMethod`, or a (calibrated) baseline method object.
        k_means: ``[num_layers, num_kv_heads, head_dim]`` key means passed to the method
            (used by ``-kc`` methods), or None.
    """

    def __init__(self, model_config_or_model, method, k_means: torch.Tensor | None = None):
        config = getattr(model_config_or_model, "config", model_config_or_model)
        num_layers, num_kv_heads, head_dim = attention_shape(config)
        self.method = as_seq_method(method, head_dim)
        self.head_dim = head_dim
        if k_means is not None and tuple(k_means.shape) != (num_layers, num_kv_heads, head_dim):
            raise ValueError(
                f"k_means has shape {tuple(k_means.shape)}, expected "
                f"[num_layers, num_kv_heads, head_dim] = {[num_layers, num_kv_heads, head_dim]}"
            )
        layers = [
            SimKVLayer(self.method, i, None if k_means is None else k_means[i].float())
            for i in range(num_layers)
        ]
        super().__init__(layers=layers)


def build_cache(model, method, k_means: torch.Tensor | None = None) -> Cache:
    """The cache that scores ``method`` as stored: :class:`SawKVCache` for token-wise
    :class:`KVMethod` s and ``saw-int4`` recipes (real bytes), :class:`SimKVCache` for
    everything else. A recipe uses its own key means, not ``k_means``."""
    if isinstance(method, Recipe) or is_saw_int4(method):
        return SawKVCache(model, method)
    if isinstance(method, str):
        method = parse_method(method)
    if isinstance(method, KVMethod):
        if method.kind == "auto":
            return SawKVCache(model, method)
        return SawKVCache(model, method, k_means=k_means if method.center_k else None)
    return SimKVCache(model, method, k_means=k_means)
