"""Torch reference attention backend: runs on any device, the CPU path and the kernels' oracle."""

from __future__ import annotations

from sawkv.attention.backend import AttentionBackend, StepContext
from sawkv.attention.reference import (
    cache_write_ref,
    paged_attention_decode_ref,
    paged_attention_extend_ref,
)
from sawkv.cache.kv_cache import LayerKV


class TorchBackend(AttentionBackend):
    """Calls the torch reference per layer (it checks its arguments each time: it is the oracle,
    not the fast path)."""

    name = "torch"

    def write(self, k, v, kv: LayerKV, ctx: StepContext) -> None:
        cache_write_ref(k, v, kv.pages, ctx.slot_mapping, kv.fmt, kv.k_mean)

    def decode(self, q, kv: LayerKV, ctx: StepContext, scale: float, out=None):
        return paged_attention_decode_ref(
            q, kv.pages, ctx.block_tables, ctx.seq_lens, kv.fmt, scale=scale,
            sliding_window=kv.sliding_window, out=out, sinks=self.sinks(kv, ctx),
        )  # fmt: skip

    def extend(self, q, kv: LayerKV, ctx: StepContext, scale: float, out=None):
        return paged_attention_extend_ref(
            q, kv.pages, ctx.block_tables, ctx.seq_lens, ctx.query_start_loc, kv.fmt,
            scale=scale, sliding_window=kv.sliding_window, out=out, sinks=self.sinks(kv, ctx),
        )  # fmt: skip
