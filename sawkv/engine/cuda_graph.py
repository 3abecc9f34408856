"""CUDA graphs for decode steps: one graph per padded batch size, replayed with static inputs.

Padded rows write nowhere (slot -1) and attend over one position of page 0; their outputs are
discarded. Graphs share one memory pool and are captured largest first.
"""

from __future__ import annotations

import numpy as np
import torch

from sawkv.attention.backend import StepContext


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, then every 16 up to 64 and every 32 beyond, capped by max_num_seqs."""
    sizes = [1, 2, 4, 8] + list(range(16, 64, 16)) + list(range(64, max_num_seqs, 32))
    return sorted({b for b in sizes if b < max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    def __init__(self, runner, max_num_seqs: int) -> None:
        self.runner = runner
        self.sizes = graph_batch_sizes(max_num_seqs)
        n, dev = self.sizes[-1], runner.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(n, runner.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.hidden: dict[int, torch.Tensor] = {}
        # request id -> (the block_table list it mirrors, int32 copy): rows are copied from
        # numpy instead of converting ~1K-entry Python lists every step
        self._tables: dict[str, tuple[list[int], np.ndarray]] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def _ctx(self, bs: int) -> StepContext:
        return StepContext(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            is_decode=True,
            max_seq_len=self.runner.max_model_len,
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        model, pool = self.runner.model, None
        for bs in reversed(self.sizes):
            ctx = self._ctx(bs)
            model(self.input_ids[:bs], self.positions[:bs], ctx)  # warm-up: autotune, allocate
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[bs] = model(self.input_ids[:bs], self.positions[:bs], ctx)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def _table_row(self, seq) -> np.ndarray:
        """``seq.block_table`` as int32. Valid while the list object is the same (pages are only
        appended to it; freeing replaces it), so only new entries are converted."""
        table = seq.block_table
        hit = self._tables.get(seq.request_id)
        if hit is None or hit[0] is not table or len(hit[1]) > len(table):
            return np.asarray(table, dtype=np.int32)
        row = hit[1]
        if len(row) < len(table):
            row = np.concatenate([row, np.asarray(table[len(row) :], dtype=np.int32)])
        return row

    @torch.inference_mode()
    def run(self, batch) -> torch.Tensor:
        """Decode ``batch`` (one new token per sequence) -> logits ``[len(batch), vocab]``."""
        n = len(batch)
        bs = next(b for b in self.sizes if b >= n)
        block_size = self.runner.spec.block_size
        ids = np.zeros(bs, dtype=np.int64)
        pos = np.zeros(bs, dtype=np.int64)
        slots = np.full(bs, -1, dtype=np.int64)
        lens = np.ones(bs, dtype=np.int32)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = np.zeros((bs, width), dtype=np.int32)
        cache = {}
        for i, seq in enumerate(batch.seqs):
            p = seq.num_tokens - 1
            ids[i], pos[i], lens[i] = seq.token_ids[-1], p, p + 1
            row = self._table_row(seq)
            cache[seq.request_id] = (seq.block_table, row)
            tables[i, : len(row)] = row
            slots[i] = seq.block_table[p // block_size] * block_size + p % block_size
        self._tables = cache
        self.input_ids[:bs].copy_(torch.from_numpy(ids), non_blocking=True)
        self.positions[:bs].copy_(torch.from_numpy(pos), non_blocking=True)
        self.slot_mapping[:bs].copy_(torch.from_numpy(slots), non_blocking=True)
        self.seq_lens[:bs].copy_(torch.from_numpy(lens), non_blocking=True)
        self.block_tables[:bs, :width].copy_(torch.from_numpy(tables), non_blocking=True)
        self.graphs[bs].replay()
        return self.runner.model.compute_logits(self.hidden[bs][:n])
