"""Page pool of the KV cache: sizes (:class:`KVCacheSpec`) and the per-layer tensors.

Per layer (heads outside tokens, so one head's page is one contiguous run for the kernels)::

    k_cache, v_cache  [num_blocks, num_kv_heads, block_size, P]
        P = head_dim // 2 uint8 (INT4, two codes per byte), head_dim uint8 (INT8),
            head_dim in the float dtype (bits 16: auto/bf16/fp16)
    k_meta, v_meta    [num_blocks, num_kv_heads, block_size, 2] fp16 (scale, min); None for 16
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from sawkv.attention.backend import LayerKV
from sawkv.quant.methods import FLOAT_DTYPES, KVMethod, parse_method


def parse_servable_method(name: str, head_dim: int) -> KVMethod:
    """Parse ``kv_cache_dtype`` and refuse what the paged engine cannot store."""
    method = parse_method(name, head_dim)
    if not method.is_servable:
        raise ValueError(
            f"kv_cache_dtype {name!r} is an evaluation-only method (simulated or unsupported by "
            f"the paged kernels); the engine serves auto, bf16, fp16, int8 and "
            f"int4[-bdr{{b}}][-kv][-kc]"
        )
    return method


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape and dtype of the pages of one model under one method."""

    method: KVMethod
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    model_dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.bits < 16 and self.block_size % 16:
            raise ValueError(
                f"kv_cache_dtype {self.method.name!r} stores tokens in groups of 16 per page, so "
                f"block_size must be a multiple of 16, got {self.block_size}"
            )

    @property
    def bits(self) -> int:
        return self.method.bits if self.method.kind == "int" else 16

    @property
    def page_dtype(self) -> torch.dtype:
        if self.bits < 16:
            return torch.uint8
        if self.method.kind == "float":
            return FLOAT_DTYPES[self.method.dtype_name]
        return self.model_dtype

    @property
    def page_dim(self) -> int:
        return self.head_dim // 2 if self.bits == 4 else self.head_dim

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one page of one layer, K and V with their metadata."""
        elem = torch.empty((), dtype=self.page_dtype).element_size()
        per_token = self.page_dim * elem + (4 if self.bits < 16 else 0)
        return 2 * self.num_kv_heads * self.block_size * per_token

    @property
    def bytes_per_block(self) -> int:
        """Bytes one page index costs across all layers."""
        return self.page_size_bytes * self.num_layers

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_per_block / self.block_size

    @property
    def had_block(self) -> int:
        return self.method.had_block or 0

    def num_blocks_for(self, memory_bytes: int) -> int:
        return int(memory_bytes // self.bytes_per_block)


def allocate_kv_cache(
    spec: KVCacheSpec,
    num_blocks: int,
    device: torch.device,
    key_means: torch.Tensor | None,
    layer_windows: list[int],
) -> list[LayerKV]:
    """Allocate every layer's pages; ``key_means [num_layers, num_kv_heads, head_dim]`` (-kc)."""
    shape = (num_blocks, spec.num_kv_heads, spec.block_size, spec.page_dim)
    meta_shape = (num_blocks, spec.num_kv_heads, spec.block_size, 2)
    quant = spec.bits < 16
    layers = []
    for i in range(spec.num_layers):
        k_mean = None
        if spec.method.center_k and key_means is not None:
            k_mean = key_means[i].to(device=device, dtype=torch.float32).contiguous()
        layers.append(
            LayerKV(
                k_cache=torch.zeros(shape, dtype=spec.page_dtype, device=device),
                v_cache=torch.zeros(shape, dtype=spec.page_dtype, device=device),
                k_meta=torch.zeros(meta_shape, dtype=torch.float16, device=device)
                if quant
                else None,
                v_meta=torch.zeros(meta_shape, dtype=torch.float16, device=device)
                if quant
                else None,
                k_mean=k_mean,
                sliding_window=layer_windows[i],
            )
        )
    return layers


def load_key_means(model_name: str, spec: KVCacheSpec) -> torch.Tensor | None:
    """Calibrated key means for ``-kc`` (``[num_layers, num_kv_heads, head_dim]``); zeros with a
    warning when none are available (e.g. dummy weights)."""
    if not spec.method.center_k:
        return None
    means = None
    try:
        from sawkv.eval.calibrate import load_key_means as _load

        means = _load(model_name)
    except (ImportError, FileNotFoundError, ValueError) as e:
        warnings.warn(f"no key means for {model_name!r} ({e}); -kc uses zeros", stacklevel=2)
    if means is None:
        warnings.warn(f"no calibrated key means for {model_name!r}; -kc uses zeros", stacklevel=2)
        return torch.zeros(spec.num_layers, spec.num_kv_heads, spec.head_dim)
    expect = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    if tuple(means.shape) != expect:
        raise ValueError(
            f"key means of {model_name!r} have shape {tuple(means.shape)}, need {expect}"
        )
    return means
