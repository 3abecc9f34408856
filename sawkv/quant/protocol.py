"""The method protocol shared by every KV method the evaluation caches score.

A token-wise :class:`~sawkv.quant.methods.KVMethod` (INT4/INT8 ... the servable formats) has
``encode`` / ``decode`` / ``fake_quant`` over ``[..., d]`` tensors; the evaluation-only
baselines (KIVI, k-means, GPTQ, mixed precision) and a per-layer :class:`~sawkv.quant.recipe.
Recipe` need the layer index or the whole sequence, so they implement :class:`SeqMethod`, and
:class:`sawkv.eval.sim_cache.SimKVCache` reads K/V through it (``TokenWise`` adapts a
``KVMethod``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SeqMethod(Protocol):
    """What a KV method offers the evaluation caches.

    Attributes:
        name: canonical method name (what results are filed under).
        seq_dependent: True if a token's reconstruction depends on later tokens (KIVI's
            per-channel key groups): the cache then re-quantizes the whole sequence per read.
        token_wise: True if every token is quantized on its own (the paged engine's model).
        is_servable: True if the paged engine can store it.
    """

    name: str
    seq_dependent: bool
    token_wise: bool
    is_servable: bool

    def resolve(self, head_dim: int) -> SeqMethod:
        """Settle head_dim-dependent choices (bare ``-bdr``) and validate; returns a method."""
        ...

    def bits_per_element(self, head_dim: int) -> float:
        """Average stored bits per K/V element, metadata included."""
        ...

    def fake_quant_seq(
        self,
        x: torch.Tensor,
        *,
        is_key: bool,
        layer_idx: int,
        k_mean: torch.Tensor | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """``x [seq, num_kv_heads, head_dim]`` of layer ``layer_idx``, whose first token is at
        position ``start`` -> what attention reads, same shape and dtype (model space).
        ``k_mean [num_kv_heads, head_dim]`` is the layer's key mean for ``-kc`` methods."""
        ...
