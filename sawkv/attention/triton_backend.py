"""Triton attention backend (CUDA): the fused write and paged attention kernels.

Kernel modules are imported lazily so CPU-only installs never import them.

Decode: INT4/INT8 pages go to the CUDA kernel (``sawkv/kernels/decode_cuda.py``) when it
builds, the rest to the Triton kernels; each launcher picks its own split count.
"""

from __future__ import annotations

from sawkv.attention.backend import AttentionBackend, LayerKV, StepContext


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        from sawkv.kernels import paged_attention_decode, paged_attention_extend
        from sawkv.kernels.cache_write import cache_write

        self._write, self._decode, self._extend = (
            cache_write,
            paged_attention_decode,
            paged_attention_extend,
        )

    def _decode_config(self, head_dim: int):
        from sawkv.kernels.tiles import DECODE_CONFIG, DECODE_CONFIG_D256

        # split counts are picked by the kernel launchers (decode.py / decode_cuda.py), from the
        # block-table width: one heuristic per kernel, no host sync
        return DECODE_CONFIG if head_dim <= 128 else DECODE_CONFIG_D256

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
            config=self._decode_config(q.shape[-1]),
            **self.quant_args,
        )

    def extend(self, q, kv: LayerKV, ctx: StepContext, scale: float, out=None):
        host = {}
        if not kv.sliding_window:  # the SDPA path loops over sequences on the host
            lens, qsl = ctx.host_lengths()
            host = dict(seq_lens_host=lens, query_start_host=qsl)
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
            **host,
            **self.quant_args,
        )
