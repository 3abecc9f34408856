"""Triton attention backend (CUDA): the fused write and paged attention kernels.

Kernel modules are imported lazily so CPU-only installs never import them.

Decode split-K: the launcher's heuristic rounded down to a power of two. ``NUM_SPLITS`` is a
compile-time constant, so the exact heuristic compiles a new kernel for many batch sizes of
mixed steps in the middle of serving (seconds each); with powers of two every variant is
compiled while the decode CUDA graphs are captured.
"""

from __future__ import annotations

import dataclasses

import torch

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
        self._configs: dict[tuple, object] = {}

    def _decode_config(self, q, block_tables, block_size: int, num_kv_heads: int):
        from sawkv.kernels.paged_attention import DECODE_CONFIG, DECODE_CONFIG_D256

        num_seqs, max_tokens = q.shape[0], block_tables.shape[1] * block_size
        key = (num_seqs, max_tokens, num_kv_heads, q.shape[-1])
        if key not in self._configs:
            base = DECODE_CONFIG if q.shape[-1] <= 128 else DECODE_CONFIG_D256
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            want = -(-2 * sms // max(1, num_seqs * num_kv_heads))
            most = max(1, max_tokens // (4 * base.block_n))
            splits = max(1, min(want, most, 64))
            splits = 1 << (splits.bit_length() - 1)
            self._configs[key] = dataclasses.replace(base, num_splits=splits)
        return self._configs[key]

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
            config=self._decode_config(
                q, ctx.block_tables, kv.k_cache.shape[2], kv.k_cache.shape[1]
            ),
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
