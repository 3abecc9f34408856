"""The per-rank model runner, the step plan rank 0 broadcasts, and the worker loop.

Every rank runs the same :class:`TPModelRunner` (its shard of the weights and of the KV heads;
the same page count, the same page ids). Only rank 0 owns a scheduler, a block manager and a
sampler. Each step rank 0 encodes the scheduled batch as a :class:`StepPlan` (per sequence:
new token ids, first position, page table, sent incrementally), broadcasts it over the host
(gloo) group, and every rank runs the identical forward; collectives inside the model keep
them in lockstep, and the logits are gathered on rank 0.

    rank 0:  schedule -> plan --broadcast--> run(batch) -> logits -> sample
    rank r:          plan <----------------- run(view)  -> (gather to rank 0)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from sawkv.cache.kv_cache import KVCacheSpec
from sawkv.config import EngineConfig, ModelConfig
from sawkv.distributed.layers import local_model_config, parallelize
from sawkv.distributed.loader import load_sharded_safetensors
from sawkv.distributed.parallel_state import (
    broadcast_object,
    min_over_ranks,
    tp_rank,
    tp_size,
)
from sawkv.engine.model_runner import ModelRunner
from sawkv.engine.scheduler import ScheduledBatch
from sawkv.models.loader import MODEL_CLASSES, _default_dtype, init_dummy


def local_spec(spec: KVCacheSpec, tp: int) -> KVCacheSpec:
    """The pages one rank allocates: its own ``num_kv_heads / tp`` heads (every layer keeps
    its format)."""
    return dataclasses.replace(spec, num_kv_heads=spec.num_kv_heads // tp)


class TPModelRunner(ModelRunner):
    """:class:`ModelRunner` over this rank's shard. Takes the *full* config, spec and key means
    and keeps this rank's part of each."""

    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        model_dir,
        spec: KVCacheSpec,
        max_model_len: int,
        key_means: torch.Tensor | None,
    ) -> None:
        self.rank, self.tp = tp_rank(), tp_size()
        self.full_model_config = model_config
        heads = model_config.num_kv_heads // self.tp
        if key_means is not None:  # [layers, kv_heads, d] -> this rank's heads
            key_means = key_means[:, self.rank * heads : (self.rank + 1) * heads].contiguous()
        super().__init__(
            config,
            local_model_config(model_config, self.tp),
            model_dir,
            local_spec(spec, self.tp),
            max_model_len,
            key_means,
        )

    def _build_model(self, model_config: ModelConfig, model_dir):
        with _default_dtype(self.dtype), torch.device(self.device):
            model = MODEL_CLASSES[model_config.architecture](
                model_config, self.backend, self.max_model_len
            )
        parallelize(model, self.full_model_config, self.rank, self.tp)
        if model_dir is None:
            init_dummy(model, self.config.seed)
        else:
            load_sharded_safetensors(model, model_dir, self.full_model_config, self.rank, self.tp)
        return model.eval().requires_grad_(False)

    def _decide_num_blocks(self) -> int:
        # one block manager (rank 0) hands out page ids valid on every rank
        return min_over_ranks(super()._decide_num_blocks())


# ---- the step plan --------------------------------------------------------------------------
@dataclass
class SeqPlan:
    """What a worker needs of one scheduled sequence. ``table_tail`` extends the page table
    the worker kept for ``request_id`` from index ``table_from`` (0: a new table)."""

    request_id: str
    num_computed_tokens: int
    new_token_ids: list[int]
    num_tokens: int
    table_from: int
    table_tail: list[int]


class _TokenWindow:
    """Token ids ``[start, start + len(ids))`` of a sequence, indexed by absolute position (the
    runner reads ``token_ids[start:start + n]`` and, for decode, ``token_ids[-1]``)."""

    def __init__(self, start: int, ids: list[int], total: int) -> None:
        self.start, self.ids, self.total = start, ids, total

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.ids[i.start - self.start : i.stop - self.start]
        i = i + self.total if i < 0 else i
        return self.ids[i - self.start]


class SeqView:
    """Stands in for a :class:`Sequence` on workers (the attributes the runner reads)."""

    def __init__(self, p: SeqPlan, table: list[int]) -> None:
        self.request_id = p.request_id
        self.num_computed_tokens = p.num_computed_tokens
        self.num_tokens = p.num_tokens
        self.token_ids = _TokenWindow(p.num_computed_tokens, p.new_token_ids, p.num_tokens)
        self.block_table = table


class PlanEncoder:
    """Rank 0: batch -> list of :class:`SeqPlan`. Page tables only grow by appending while a
    sequence runs (freeing replaces the list), so a table already sent goes as its new tail."""

    def __init__(self) -> None:
        self._sent: dict[str, tuple[list[int], int]] = {}

    def encode(self, batch: ScheduledBatch) -> list[SeqPlan]:
        plans, sent = [], {}
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, table = seq.num_computed_tokens, seq.block_table
            prev = self._sent.get(seq.request_id)
            frm = prev[1] if prev is not None and prev[0] is table and prev[1] <= len(table) else 0
            plans.append(
                SeqPlan(
                    seq.request_id,
                    start,
                    seq.token_ids[start : start + n],
                    seq.num_tokens,
                    frm,
                    table[frm:],
                )
            )
            sent[seq.request_id] = (table, len(table))
        self._sent = sent  # sequences absent this step start over (the worker forgets them too)
        return plans


class PlanDecoder:
    """Workers: list of :class:`SeqPlan` -> a :class:`ScheduledBatch` of :class:`SeqView`."""

    def __init__(self) -> None:
        self._tables: dict[str, list[int]] = {}

    def decode(self, plans: list[SeqPlan]) -> ScheduledBatch:
        views, tables = [], {}
        for p in plans:
            table = self._tables.get(p.request_id) if p.table_from else None
            if table is None or len(table) != p.table_from:
                if p.table_from:
                    raise RuntimeError(f"worker lost the page table of {p.request_id!r}")
                table = []
            table.extend(p.table_tail)  # in place: the decode graphs cache rows per list object
            tables[p.request_id] = table
            views.append(SeqView(p, table))
        self._tables = tables
        return ScheduledBatch(views, [len(p.new_token_ids) for p in plans])


# ---- commands -------------------------------------------------------------------------------
def time_all_reduce(device: torch.device, num_tokens: int, hidden: int, dtype, iters: int):
    """Seconds per all-reduce of a ``[num_tokens, hidden]`` tensor (all ranks call it)."""
    from sawkv.distributed.parallel_state import all_reduce

    x = torch.ones(num_tokens, hidden, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    for _ in range(5):
        all_reduce(x)
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        all_reduce(x)
    sync()
    return (time.perf_counter() - t) / iters


def worker_loop(runner: TPModelRunner) -> None:
    """Ranks > 0: execute rank 0's commands until ``stop``."""
    decoder = PlanDecoder()
    while True:
        cmd, arg = broadcast_object()
        if cmd == "run":
            runner.run(decoder.decode(arg))
        elif cmd == "replay":
            runner.graphs.graphs[arg].replay()
        elif cmd == "all_reduce":
            time_all_reduce(runner.device, *arg)
        elif cmd == "stop":
            return
        else:
            raise RuntimeError(f"unknown tensor-parallel command {cmd!r}")
