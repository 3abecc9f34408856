"""Attention backend contract: the per-step context and the backend ABC.

The model runner builds one :class:`StepContext` per step on the host (slot mapping, block
tables, lengths), calls :meth:`AttentionBackend.plan` on it once, and hands the same object to
every layer; each layer's :meth:`AttentionBackend.forward` writes the new K/V into its pages
(:class:`~sawkv.cache.kv_cache.LayerKV`) and attends over them. Backends are picked by name
through :mod:`sawkv.attention.registry`.

Length diagram of one sequence in a step::

    positions  0 ............. seq_len-q_len ............ seq_len-1
               |<- cached (context_len) ->|<- new tokens (q_len) ->|
    block_tables[s] maps positions // block_size to pages; slot_mapping holds
    page * block_size + position % block_size of every new token (-1: padding, not written).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from sawkv.cache.kv_cache import LayerKV


@dataclass
class StepContext:
    """What every layer needs to know about the current step (tensors on the model's device).

    slot_mapping ``[num_tokens]`` int64; block_tables ``[num_seqs, max_blocks]`` int32;
    seq_lens ``[num_seqs]`` int32 (new tokens included); query_start_loc ``[num_seqs + 1]``
    int32; ``is_decode``: every sequence has exactly one new token (decode kernels, CUDA
    graphs); ``max_seq_len`` / ``max_query_len`` host-side bounds for kernels that size their
    grid.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    is_decode: bool
    max_seq_len: int
    max_query_len: int = 1
    # Mixed steps: the runner puts sequences with at most the backend's
    # reorder_batch_threshold new tokens first; their tokens run in the decode kernel
    # (split-K, one row per token) and the rest in the extend kernel.
    decode_part: StepContext | None = None
    extend_part: StepContext | None = None
    # Host copies of seq_lens / query_start_loc for kernels that loop over sequences on the host
    # (the SDPA extend path); filled by the planner, or once per step on first use.
    seq_lens_host: list[int] | None = None
    query_start_loc_host: list[int] | None = None
    # The backend's plans for this step, one per (kernel, page format): made by the first layer
    # of each format and reused by the others (AttentionBackend.plan resets them).
    plans: dict = field(default_factory=dict)
    # Attention sinks written this step: token rows ``[n]`` int64 and their flat sink index
    # (``first_page * num_sink + position``, :class:`~sawkv.cache.kv_cache.SinkStore`); None
    # when no new token is a sink (every CUDA-graph step).
    sink_src: torch.Tensor | None = None
    sink_dst: torch.Tensor | None = None

    def host_lengths(self) -> tuple[list[int], list[int]]:
        """(seq_lens, query_start_loc) as host lists, read from the device once per step."""
        if self.seq_lens_host is None:
            self.seq_lens_host = self.seq_lens.tolist()
        if self.query_start_loc_host is None:
            self.query_start_loc_host = self.query_start_loc.tolist()
        return self.seq_lens_host, self.query_start_loc_host

    def parts(self) -> list[StepContext]:
        """This context and its decode / extend sub-contexts."""
        return [c for c in (self, self.decode_part, self.extend_part) if c is not None]


class AttentionBackend(ABC):
    """Writes K/V into pages and runs paged attention for one layer.

    A backend holds no per-format state: each layer's :class:`LayerKV` carries its pages and
    their :class:`~sawkv.kernels.page_format.PageFormat`, so one backend serves a model whose
    recipe mixes formats.
    """

    name = "base"
    # Sequences with at most this many new tokens run through the decode kernel (one row per
    # token) in mixed steps; the model runner puts them first (vLLM's reorder_batch_threshold).
    reorder_batch_threshold: int = 16

    def plan(self, ctx: StepContext) -> None:
        """Prepare ``ctx`` for this step's layers, once, on the host.

        Drops plans left from an earlier use of ``ctx``; the first layer of each page format
        then plans (checks, split counts, workspaces) and the others reuse it. Under CUDA-graph
        capture, call this before the captured forward so the plans are made (and their
        workspaces allocated from the graph's pool) during capture, as every other allocation
        of the captured forward is.
        """
        for part in ctx.parts():
            part.plans = {}

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv: LayerKV,
        ctx: StepContext,
        scale: float,
    ) -> torch.Tensor:
        """``q [T, Hq, d]``, ``k, v [T, Hkv, d]`` (post-RoPE) -> ``[T, Hq, d]`` in q's dtype."""
        self.write(k, v, kv, ctx)
        if kv.sinks is not None and ctx.sink_dst is not None:
            kv.sinks.write(k, v, ctx.sink_src, ctx.sink_dst)
        if ctx.is_decode:
            return self.decode(q, kv, ctx, scale)
        if ctx.decode_part is None:
            return self.extend(q, kv, ctx, scale)
        out = torch.empty_like(q)
        n = ctx.decode_part.seq_lens.shape[0]
        self.decode(q[:n], kv, ctx.decode_part, scale, out=out[:n])
        if ctx.extend_part is not None:
            self.extend(q[n:], kv, ctx.extend_part, scale, out=out[n:])
        return out

    @staticmethod
    def sinks(kv: LayerKV, ctx: StepContext):
        """The exact sinks of ``ctx``'s sequences for this layer
        (:class:`~sawkv.kernels.sinks.SinkKV`), or None if the layer keeps none."""
        if kv.sinks is None:
            return None
        rows = ctx.plans.get("sink_rows")  # once per step: every layer's store shares them
        if rows is None:
            rows = ctx.plans["sink_rows"] = kv.sinks.rows(ctx.block_tables)
        return kv.sinks.read(rows, kv.k_mean)

    @abstractmethod
    def write(self, k, v, kv: LayerKV, ctx: StepContext) -> None:
        """Store ``k, v [T, Hkv, d]`` at ``ctx.slot_mapping`` in ``kv``'s pages."""

    @abstractmethod
    def decode(self, q, kv: LayerKV, ctx: StepContext, scale: float, out=None) -> torch.Tensor:
        """One query token per sequence of ``ctx``; written into ``out`` if given."""

    @abstractmethod
    def extend(self, q, kv: LayerKV, ctx: StepContext, scale: float, out=None) -> torch.Tensor:
        """Several query tokens per sequence of ``ctx``; written into ``out`` if given."""
