"""CUDA graphs for decode steps: one graph per padded batch size, replayed with static inputs.

Graphs compute no inputs of their own: :meth:`DecodeGraphs.run` copies the device inputs the
eager path built (:mod:`sawkv.engine.device_step`) into static buffers and replays. Padded rows
write nowhere (slot -1) and attend over one position; their outputs are discarded. Graphs
share one memory pool and are captured largest first.
"""

from __future__ import annotations

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
        model, backend, pool = self.runner.model, self.runner.backend, None
        for bs in reversed(self.sizes):
            ctx = self._ctx(bs)
            backend.plan(ctx)
            model(self.input_ids[:bs], self.positions[:bs], ctx)  # warm-up: autotune, allocate
            graph = torch.cuda.CUDAGraph()
            # plan again: the first layer re-plans during capture, so the plan's workspaces come
            # from the graph pool like every other allocation of the captured forward (split
            # counts depend only on the static shapes, so every replay fits the plan)
            backend.plan(ctx)
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[bs] = model(self.input_ids[:bs], self.positions[:bs], ctx)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext):
        """Replay the graph of the smallest captured size >= ``n`` with the step's own device
        inputs (``input_ids, positions [n]``, a decode ``ctx``) -> hidden ``[n, hidden]``.

        The inputs are copied into the static buffers; rows ``n..bs`` are reset to padding
        (slot -1: nothing written; length 1). Block-table entries past a row's length may be
        stale: lengths bound every read."""
        n = input_ids.shape[0]
        bs = next(b for b in self.sizes if b >= n)
        width = ctx.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(ctx.slot_mapping)
        self.seq_lens[:n].copy_(ctx.seq_lens)
        self.block_tables[:n, :width].copy_(ctx.block_tables)
        if bs > n:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
        self.graphs[bs].replay()
        return self.hidden[bs][:n]
