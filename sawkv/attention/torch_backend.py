"""Torch reference attention backend: runs on any device, the CPU path and the kernels' oracle."""

from __future__ import annotations

from sawkv.attention.backend import AttentionBackend, LayerKV, StepContext
from sawkv.attention.reference import (
    cache_write_ref,
    paged_attention_decode_ref,
    paged_attention_extend_ref,
)


class TorchBackend(AttentionBackend):
    name = "torch"

    def write(self, k, v, kv: LayerKV, ctx: StepContext) -> None:
        cache_write_ref(
            k,
            v,
            kv.k_cache,
            kv.v_cache,
            kv.k_meta,
            kv.v_meta,
            ctx.slot_mapping,
            kv.k_mean,
            **self.quant_args,
        )

    def decode(self, q, kv: LayerKV, ctx: StepContext, scale: float, out=None):
        return paged_attention_decode_ref(
            q,
            kv.k_cache,
            kv.v_cache,
            kv.k_meta,
            kv.v_meta,
            ctx.block_tables,
            ctx.seq_lens,
            scale=scale,
            sliding_window=kv.sliding_window,
            out=out,
            **self.quant_args,
        )

    def extend(self, q, kv: LayerKV, ctx: StepContext, scale: float, out=None):
        return paged_attention_extend_ref(
            q,
            kv.k_cache,
            kv.v_cache,
            kv.k_meta,
            kv.v_meta,
            ctx.block_tables,
            ctx.seq_lens,
            ctx.query_start_loc,
            scale=scale,
            sliding_window=kv.sliding_window,
            out=out,
            **self.quant_args,
        )
