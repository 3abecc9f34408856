"""Triton attention backend (CUDA): the fused write and paged attention kernels.

Kernel modules are imported when the backend is built (through the registry), so CPU-only
installs never import them.

Per step and page format, the first layer plans the launch (:func:`sawkv.kernels.plan_decode`
/ :func:`sawkv.kernels.plan_extend`: checks, kernel choice, split count, workspaces, host
lengths) and stores the plan on the :class:`StepContext`; every later layer of that format only
launches. INT4/INT8 decode goes to the CUDA kernel (``sawkv/kernels/decode_cuda.py``) when it
builds, the rest to the Triton kernels.
"""

from __future__ import annotations

from sawkv.attention.backend import AttentionBackend, StepContext
from sawkv.cache.kv_cache import LayerKV


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self) -> None:
        import sawkv.kernels

        self._k = sawkv.kernels

    def write(self, k, v, kv: LayerKV, ctx: StepContext) -> None:
        # every layer of a format (and centering) writes the same shapes: check the first
        # layer's call of the step only
        key = ("write", kv.fmt, kv.k_mean is not None)
        checked = key in ctx.plans
        ctx.plans[key] = True
        # a decode step's tokens never fill a 16-token group: the group path would only add its
        # group-start checks (on the H100 at c=1: 4.3 against ~1.6 us a layer)
        self._k.cache_write(
            k, v, kv.pages, ctx.slot_mapping, kv.fmt, kv.k_mean, check=not checked,
            group_path=not ctx.is_decode,
        )  # fmt: skip

    def _decode_plan(self, q, kv: LayerKV, ctx: StepContext):
        key = ("decode", kv.fmt)
        plan = ctx.plans.get(key)
        if plan is None:
            plan = ctx.plans[key] = self._k.plan_decode(
                q, ctx.block_tables, ctx.seq_lens, kv.fmt, sliding_window=kv.sliding_window
            )
        return plan

    def _extend_plan(self, q, kv: LayerKV, ctx: StepContext):
        # layers with sinks get a plan of their own (SDPA on every dtype, sink rows planned)
        num_sink = 0 if kv.sinks is None else kv.sinks.num_sink
        key = ("extend", kv.fmt, num_sink)
        plan = ctx.plans.get(key)
        if plan is None:
            lens, qsl = ctx.host_lengths()
            plan = ctx.plans[key] = self._k.plan_extend(
                q, ctx.block_tables, ctx.seq_lens, ctx.query_start_loc, kv.fmt,
                sliding_window=kv.sliding_window, max_query_len=ctx.max_query_len,
                seq_lens_host=lens, query_start_host=qsl, num_sink=num_sink,
            )  # fmt: skip
        return plan

    def decode(self, q, kv: LayerKV, ctx: StepContext, scale: float, out=None):
        return self._k.paged_attention_decode(
            q, kv.pages, ctx.block_tables, ctx.seq_lens, kv.fmt, scale=scale,
            sliding_window=kv.sliding_window, out=out, plan=self._decode_plan(q, kv, ctx),
            sinks=self.sinks(kv, ctx),
        )  # fmt: skip

    def extend(self, q, kv: LayerKV, ctx: StepContext, scale: float, out=None):
        return self._k.paged_attention_extend(
            q, kv.pages, ctx.block_tables, ctx.seq_lens, ctx.query_start_loc, kv.fmt,
            scale=scale, sliding_window=kv.sliding_window, out=out,
            plan=self._extend_plan(q, kv, ctx), sinks=self.sinks(kv, ctx),
        )  # fmt: skip
