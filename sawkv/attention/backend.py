"""Attention backend contract: per-step context, per-layer pages, and the backend ABC.

The model runner plans one :class:`StepContext` per step on the host (slot mapping, block
tables, lengths) and hands the same object to every layer; each layer's
:meth:`AttentionBackend.forward` writes the new K/V into its pages and attends over them,
allocation-free apart from the output. Backends are picked by name with :func:`get_backend`.

Length diagram of one sequence in a step::

    positions  0 ............. seq_len-q_len ............ seq_len-1
               |<- cached (context_len) ->|<- new tokens (q_len) ->|
    block_tables[s] maps positions // block_size to pages; slot_mapping holds
    page * block_size + position % block_size of every new token (-1: padding, not written).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

# In mixed steps, sequences with at most this many new tokens run through the decode kernel
# (one row per token); the scheduler puts them first.
DECODE_MAX_QUERY = 16


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
    # Mixed steps: the scheduler puts sequences with few new tokens first; their tokens run in
    # the decode kernel (split-K, one row per token) and the rest in the extend kernel.
    decode_part: StepContext | None = None
    extend_part: StepContext | None = None
    # Host copies of seq_lens / query_start_loc for kernels that loop over sequences on the host
    # (the SDPA extend path); filled by the planner, or once per step on first use.
    seq_lens_host: list[int] | None = None
    query_start_loc_host: list[int] | None = None

    def host_lengths(self) -> tuple[list[int], list[int]]:
        """(seq_lens, query_start_loc) as host lists, read from the device once per step."""
        if self.seq_lens_host is None:
            self.seq_lens_host = self.seq_lens.tolist()
        if self.query_start_loc_host is None:
            self.query_start_loc_host = self.query_start_loc.tolist()
        return self.seq_lens_host, self.query_start_loc_host


@dataclass
class LayerKV:
    """One layer's pages (layout in :mod:`sawkv.cache.kv_cache`) and its attention settings."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_meta: torch.Tensor | None
    v_meta: torch.Tensor | None
    k_mean: torch.Tensor | None  # [num_kv_heads, head_dim] key mean for -kc, else None
    sliding_window: int = 0


class AttentionBackend(ABC):
    """Writes K/V into pages and runs paged attention for one layer.

    ``bits`` 4/8/16, ``had_block`` 0 or the Hadamard block, ``rotate_v`` as in
    :class:`sawkv.quant.methods.KVMethod`.
    """

    name = "base"

    def __init__(self, *, bits: int, had_block: int, rotate_v: bool) -> None:
        self.bits, self.had_block, self.rotate_v = bits, had_block, rotate_v

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

    @property
    def quant_args(self) -> dict:
        return dict(bits=self.bits, had_block=self.had_block, rotate_v=self.rotate_v)

    @abstractmethod
    def write(self, k, v, kv: LayerKV, ctx: StepContext) -> None: ...

    @abstractmethod
    def decode(self, q, kv: LayerKV, ctx: StepContext, scale: float, out=None) -> torch.Tensor:
        """One query token per sequence of ``ctx``; written into ``out`` if given."""

    @abstractmethod
    def extend(self, q, kv: LayerKV, ctx: StepContext, scale: float, out=None) -> torch.Tensor:
        """Several query tokens per sequence of ``ctx``; written into ``out`` if given."""


def get_backend(name: str, device: torch.device, **kw) -> AttentionBackend:
    """``"auto"`` -> triton on CUDA, torch elsewhere; ``"torch"``; ``"triton"``."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from sawkv.attention.torch_backend import TorchBackend

        return TorchBackend(**kw)
    if name == "triton":
        if device.type != "cuda":
            raise ValueError(f"the triton attention backend needs a CUDA device, got {device}")
        from sawkv.attention.triton_backend import TritonBackend

        return TritonBackend(**kw)
    raise ValueError(f"unknown attention backend {name!r}; valid: auto, torch, triton")
