"""Page pool of the KV cache: sizes (:class:`KVCacheSpec`) and per-layer pages (:class:`LayerKV`).

Per layer (heads outside tokens, so one head's page is one contiguous run for the kernels; the
layout is :mod:`sawkv.kernels.page_format`'s)::

    k_cache, v_cache  [num_blocks, num_kv_heads, block_size, P]
        P = head_dim // 2 uint8 (INT4, two codes per byte), head_dim uint8 (INT8),
            head_dim in the float dtype (bits 16: auto/bf16/fp16)
    k_meta            [num_blocks, num_kv_heads, block_size, 2] fp16 (scale, min), or 4
                      (scale_lo, min_lo, scale_hi, min_hi) with ``-kh``; None for 16
    v_meta            [num_blocks, num_kv_heads, block_size, 2] fp16 (scale, min); None for 16

Layers may differ (a ``saw-int4`` :class:`~sawkv.quant.recipe.Recipe`: INT4 with its own
Hadamard block per layer, INT8 for a few): every layer then has its own
:class:`~sawkv.kernels.page_format.PageFormat` (:meth:`KVCacheSpec.layer_format`) and size,
and one page index costs the sum of the layers' page sizes (:attr:`KVCacheSpec.bytes_per_block`),
which is what the pool is sized by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sawkv.kernels.page_format import KVPages, PageFormat
from sawkv.kernels.sinks import SinkKV
from sawkv.quant.methods import FLOAT_DTYPES, KVMethod, parse_method
from sawkv.quant.recipe import Recipe


def parse_servable_method(name: str, head_dim: int) -> KVMethod:
    """Parse ``kv_cache_dtype`` and refuse what the paged engine cannot store."""
    method = parse_method(name, head_dim)
    if not method.is_servable:
        raise ValueError(
            f"kv_cache_dtype {name!r} is an evaluation-only method (simulated or unsupported by "
            f"the paged kernels); the engine serves saw-int4, auto, bf16, fp16 and "
            f"int4|int8[-bdr{{b}}][-kv][-kc][-kh]"
        )
    return method


@dataclass
class SinkStore:
    """Exact K/V of every sequence's first ``num_sink`` positions, for one layer.

    ``k, v [num_first_blocks, num_sink, num_kv_heads, head_dim]`` in the model dtype. Row ``i``
    belongs to whichever sequence has page ``i`` as its first page: the block manager hands out
    first pages from ``0 .. num_first_blocks - 1`` only, so prefix-cache hits (which share the
    first page) and preemption (which frees it) need no bookkeeping of their own.
    """

    k: torch.Tensor
    v: torch.Tensor

    @property
    def num_sink(self) -> int:
        return self.k.shape[1]

    @property
    def num_first_blocks(self) -> int:
        return self.k.shape[0]

    def write(self, k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor):
        """Store rows ``src [n]`` int64 of the step's ``k, v [T, H, d]`` at flat sink index
        ``dst [n]`` int64 (``first_page * num_sink + position``)."""
        for store, x in ((self.k, k), (self.v, v)):
            store.view(-1, *store.shape[2:]).index_copy_(0, dst, x.index_select(0, src))

    def rows(self, block_tables: torch.Tensor) -> torch.Tensor:
        """``[S]`` int64 sink rows of the sequences of ``block_tables [S, >= 1]`` (their first
        pages). Rows of padding (CUDA-graph batches) may name any page: they are clamped into
        range, and their outputs are discarded. Every layer's store shares them."""
        return block_tables[:, 0].long().clamp(0, self.num_first_blocks - 1)

    def read(self, rows: torch.Tensor, k_mean: torch.Tensor | None) -> SinkKV:
        """The sinks at ``rows`` (:meth:`rows`), as the kernels take them."""
        return SinkKV(self.k.index_select(0, rows), self.v.index_select(0, rows), k_mean)


@dataclass
class LayerKV:
    """One layer's pages, their format and the layer's attention settings.

    ``pages`` in format ``fmt`` (shapes in the module docstring); ``k_mean [num_kv_heads,
    head_dim]`` fp32 key mean the writer subtracts (``-kc``), else None; ``sliding_window`` > 0
    keeps the last that many positions (0 = full attention); ``sinks`` the exact first
    positions (a ``saw-int4`` recipe's attention sinks), else None.
    """

    pages: KVPages
    fmt: PageFormat
    k_mean: torch.Tensor | None = None
    sliding_window: int = 0
    sinks: SinkStore | None = None


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape and dtype of the pages of one model under one method.

    ``method`` is one :class:`KVMethod` for every layer, or a :class:`Recipe` giving each layer
    its own format. The page properties (``bits``, ``page_dim``, ``page_dtype``,
    ``had_block``, ``page_size_bytes``) describe the pages of a uniform spec; under a recipe
    ask :meth:`layer` for one layer's. Sizes that count the whole pool
    (``bytes_per_block``, ``bytes_per_token``, ``num_blocks_for``) hold for both.
    """

    method: KVMethod | Recipe
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    model_dtype: torch.dtype

    def __post_init__(self) -> None:
        if isinstance(self.method, Recipe) and self.method.num_layers != self.num_layers:
            raise ValueError(
                f"the recipe has {self.method.num_layers} layers, the model {self.num_layers}"
            )
        quantized = not self.is_uniform or self.bits < 16  # a recipe's layers are INT4/INT8
        if quantized and self.block_size % 16:
            raise ValueError(
                f"kv_cache_dtype {self.method.name!r} stores tokens in groups of 16 per page, so "
                f"block_size must be a multiple of 16, got {self.block_size}"
            )

    @property
    def is_uniform(self) -> bool:
        """Every layer has the same page format."""
        return not isinstance(self.method, Recipe)

    def layer_method(self, layer_idx: int) -> KVMethod:
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer {layer_idx} of a {self.num_layers}-layer spec")
        return self.method if self.is_uniform else self.method.layer_method(layer_idx)

    def layer(self, layer_idx: int) -> KVCacheSpec:
        """The pages of one layer, as a uniform one-layer spec."""
        return KVCacheSpec(self.layer_method(layer_idx), 1, self.num_kv_heads, self.head_dim,
                           self.block_size, self.model_dtype)  # fmt: skip

    def _uniform(self, what: str) -> KVMethod:
        if not self.is_uniform:
            raise ValueError(
                f"{what} differs per layer under {self.method.name}: use spec.layer(i).{what}"
            )
        return self.method

    @property
    def bits(self) -> int:
        method = self._uniform("bits")
        return method.bits if method.kind == "int" else 16

    @property
    def page_dtype(self) -> torch.dtype:
        method = self._uniform("page_dtype")
        if self.bits < 16:
            return torch.uint8
        if method.kind == "float":
            return FLOAT_DTYPES[method.dtype_name]
        return self.model_dtype

    @property
    def page_dim(self) -> int:
        return self.head_dim // 2 if self.bits == 4 else self.head_dim

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one page of one layer, K and V with their metadata."""
        self._uniform("page_size_bytes")
        return self.layer_format(0).page_size_bytes

    @property
    def bytes_per_block(self) -> int:
        """Bytes one page index costs across all layers (each layer at its own format)."""
        if self.is_uniform:
            return self.page_size_bytes * self.num_layers
        return sum(self.layer(i).page_size_bytes for i in range(self.num_layers))

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_per_block / self.block_size

    @property
    def had_block(self) -> int:
        return self._uniform("had_block").had_block or 0

    def layer_format(self, layer_idx: int) -> PageFormat:
        """The :class:`PageFormat` of one layer's pages (what its kernels are told)."""
        lspec = self.layer(layer_idx)
        return PageFormat(
            bits=lspec.bits,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            block_size=self.block_size,
            had_block=lspec.had_block,
            rotate_v=lspec.method.rotate_v,
            dtype=lspec.page_dtype,
            k_half_meta=lspec.method.k_half_meta,
        )

    def num_blocks_for(self, memory_bytes: int) -> int:
        return int(memory_bytes // self.bytes_per_block)

    @property
    def num_sink(self) -> int:
        """Sink tokens kept exact per sequence (a recipe's), else 0."""
        return getattr(self.method, "num_sink", 0)

    def sink_bytes(self, num_first_blocks: int) -> int:
        """Bytes of the sink stores (:class:`SinkStore`) of all layers."""
        per_layer = 2 * num_first_blocks * self.num_sink * self.num_kv_heads * self.head_dim
        return self.num_layers * per_layer * self.model_dtype.itemsize


def allocate_kv_cache(
    spec: KVCacheSpec,
    num_blocks: int,
    device: torch.device,
    key_means: torch.Tensor | None,
    layer_windows: list[int],
    num_first_blocks: int = 0,
) -> list[LayerKV]:
    """Allocate every layer's pages, each in its own format; ``key_means [num_layers,
    num_kv_heads, head_dim]`` are handed to the layers whose format centers keys (-kc).
    With ``spec.num_sink`` and ``num_first_blocks`` > 0, every layer also gets a
    :class:`SinkStore` of ``num_first_blocks`` rows."""
    layers = []
    for i in range(spec.num_layers):
        fmt = spec.layer_format(i)
        k_mean = None
        if spec.layer_method(i).center_k and key_means is not None:
            k_mean = key_means[i].to(device=device, dtype=torch.float32).contiguous()
        sinks = None
        if spec.num_sink and num_first_blocks:
            shape = (num_first_blocks, spec.num_sink, spec.num_kv_heads, spec.head_dim)
            kw = dict(dtype=spec.model_dtype, device=device)
            sinks = SinkStore(torch.zeros(shape, **kw), torch.zeros(shape, **kw))
        pages = fmt.empty_pages(num_blocks, device)
        layers.append(LayerKV(pages, fmt, k_mean, layer_windows[i], sinks))
    return layers
