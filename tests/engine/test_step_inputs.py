"""The step planner against per-token reference arithmetic, and the device block table kept in
step with the sequences' page lists through incremental edits (rows reused, lists replaced)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sawkv.attention.torch_backend import TorchBackend
from sawkv.engine.device_step import BlockTable, upload
from sawkv.engine.model_runner import ModelRunner
from sawkv.engine.scheduler import ScheduledBatch
from sawkv.engine.step_inputs import StepPlanner, reorder_batch

BS, ROWS, COLS = 4, 3, 8


def seq(rid, num_tokens, computed, table):
    return SimpleNamespace(
        request_id=rid,
        token_ids=[100 + 7 * i % 50 for i in range(num_tokens)],
        num_tokens=num_tokens,
        num_computed_tokens=computed,
        block_table=table,
    )


def reference(seqs, q_lens):
    """Plain per-token loops over the length diagram."""
    ids, pos, slots, logits, sampled = [], [], [], [], []
    for i, (s, q) in enumerate(zip(seqs, q_lens)):
        for p in range(s.num_computed_tokens, s.num_computed_tokens + q):
            ids.append(s.token_ids[p])
            pos.append(p)
            slots.append(s.block_table[p // BS] * BS + p % BS)
        if s.num_computed_tokens + q == s.num_tokens:
            logits.append(len(ids) - 1)
            sampled.append(i)
    return ids, pos, slots, logits, sampled


def check(planner, table, seqs, q_lens):
    inputs = planner.plan(seqs, q_lens)
    ids, pos, slots, logits, sampled = reference(seqs, q_lens)
    assert inputs.input_ids.tolist() == ids and inputs.positions.tolist() == pos
    assert inputs.slot_mapping.tolist() == slots
    assert inputs.logits_indices.tolist() == logits and inputs.sampled_seqs.tolist() == sampled
    assert inputs.seq_lens.tolist() == [s.num_computed_tokens + q for s, q in zip(seqs, q_lens)]
    assert inputs.query_start_loc.tolist() == np.cumsum([0, *q_lens]).tolist()
    ctx = upload(inputs, table, BS).ctx
    assert ctx.slot_mapping.tolist() == slots
    for row, s in zip(ctx.block_tables.tolist(), seqs):  # the device rows mirror the lists
        n = -(-(s.num_computed_tokens + max(q_lens)) // BS)
        assert row[: min(n, len(s.block_table))] == s.block_table[: min(n, len(row))]
    return inputs


def test_plan_matches_reference_and_edits_are_incremental():
    planner, table = (
        StepPlanner(ROWS, COLS, BS, decode_threshold=16),
        BlockTable(ROWS, COLS, torch.device("cpu")),
    )
    a, b = seq("a", 10, 0, [5, 2, 9]), seq("b", 4, 0, [7])
    first = check(planner, table, [a, b], [10, 4])  # two prefills, both sampled
    assert first.kind == "prefill" and len(first.table_values) == 4
    for s in (a, b):
        s.num_computed_tokens = s.num_tokens
        s.token_ids.append(42)
        s.num_tokens += 1
    b.block_table.append(11)  # in place: only this page is new; b's token 4 lands on it
    second = check(planner, table, [a, b], [1, 1])
    assert second.kind == "decode" and second.table_values.tolist() == [11]
    assert second.slot_mapping.tolist() == [9 * BS + 2, 11 * BS + 0]
    b.block_table = [3, 4]  # freed and re-allocated (preemption): the whole list is resent
    b.num_computed_tokens = 0
    third = check(planner, table, [a, b], [1, 4])
    assert third.kind == "mixed" and sorted(third.table_values.tolist()) == [3, 4]
    assert third.num_decode_seqs == 2  # both have at most decode_threshold new tokens
    # a leaves the step: its row goes to c, which is sent whole
    c = seq("c", 20, 0, [1, 6, 8, 0, 12])
    fourth = check(planner, table, [c, b], [20, 1])
    assert sorted(fourth.table_values.tolist()) == [0, 1, 6, 8, 12]
    assert fourth.num_decode_seqs == 0 and fourth.logits_indices.tolist() == [19]


def test_too_many_sequences_in_a_step():
    planner = StepPlanner(2, COLS, BS, decode_threshold=16)
    seqs = [seq(f"s{i}", 2, 0, [i]) for i in range(3)]
    with pytest.raises(RuntimeError, match="more than 2 sequences"):
        planner.plan(seqs, [2, 2, 2])


@pytest.mark.parametrize(
    "q_lens, want",
    [([1, 2, 40], None), ([40, 1, 17, 3], [1, 3, 0, 2]), ([20, 30], None), ([5, 60, 1], [0, 2, 1])],
)
def test_reorder_batch_puts_short_queries_first(q_lens, want):
    assert reorder_batch(q_lens, 16) == want


def test_runner_reorders_for_the_backend_and_maps_samples_back():
    """The runner puts few-token sequences first (the backend's threshold) and reports sampled
    rows as indices into the scheduler's batch, so the engine samples for the right sequence."""
    backend = TorchBackend()
    runner = SimpleNamespace(
        backend=backend,
        planner=StepPlanner(ROWS, COLS, BS, decode_threshold=backend.reorder_batch_threshold),
    )
    big = seq("big", 20, 0, [1, 6, 8, 0, 12])  # a 20-token prefill chunk, sampled
    small = seq("small", 3, 2, [4])  # one decode token, sampled
    inputs = ModelRunner.plan(runner, ScheduledBatch([big, small], [20, 1]))
    assert inputs.num_decode_seqs == 1  # small went first
    assert inputs.seq_lens.tolist() == [3, 20]
    assert inputs.input_ids[0] == small.token_ids[2]
    assert inputs.logits_indices.tolist() == [0, 20]
    assert inputs.sampled_seqs.tolist() == [1, 0]  # row 0 is batch.seqs[1] (small)
