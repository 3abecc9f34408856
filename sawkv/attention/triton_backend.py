"""Triton attention backend (CUDA): the fused write and paged attention kernels.

Kernel modules are imported lazily so CPU-only installs never import them.
"""

from __future__ import annotations

from sawkv.attention.backend import AttentionBackend, LayerKV, StepContext


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        from sawkv.kernels.cache_write import cache_write
        from sawkv.kernels.paged_attention import paged_attention_decode, paged_attention_extend

        self._write, self._decode, self._extend = (
            cache_write,
            paged_attention_decode,
            paged_attention_extend,
        )

    def write(self, k, v, kv: LayerKV, ctx: StepContext) -> None:
        self._write(
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
        return self._decode(
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
        return self._extend(
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
            max_query_len=ctx.max_query_len,
            **self.quant_args,
        )
