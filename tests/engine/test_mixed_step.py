"""A mixed step (sequences with few new tokens + a prefill chunk) split into decode rows and an
extend call gives the same attention as one extend call over the whole batch (torch backend)."""

from __future__ import annotations

import pytest
import torch

from sawkv.attention.reference import paged_attention_extend_ref
from sawkv.attention.torch_backend import TorchBackend
from sawkv.cache.kv_cache import LayerKV
from sawkv.engine.device_step import BlockTable
from sawkv.engine.step_inputs import StepPlanner
from sawkv.kernels import PageFormat

BS, HKV, HQ, D, NUM_BLOCKS = 16, 2, 4, 64, 20  # INT4 pages hold tokens in groups of 16


def make_kv(bits, had_block, window):
    fmt = PageFormat(bits, D, HKV, BS, had_block, dtype=torch.float32 if bits == 16 else None)
    return LayerKV(fmt.empty_pages(NUM_BLOCKS), fmt, None, window)


CASES = {
    # (block tables, seq_lens, q_lens): decode rows first (q_len <= 16), then extend
    "mixed": ([[3, 1, 7], [2, 5], [0, 4, 6, 8, 9, 10, 11]], [40, 30, 100], [1, 3, 20]),
    "all_small": ([[3, 1, 7], [2, 5]], [40, 30], [1, 5]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bits,had_block,window", [(16, 0, 0), (4, 32, 0), (8, 0, 5)])
def test_split_step_equals_single_extend(case, bits, had_block, window, plan_and_upload):
    torch.manual_seed(0)
    tables, seq_lens, q_lens = CASES[case]
    kv = make_kv(bits, had_block, window)
    backend = TorchBackend()
    threshold = backend.reorder_batch_threshold
    planner = StepPlanner(4, 8, BS, decode_threshold=threshold)
    table = BlockTable(4, 8, torch.device("cpu"))
    old = [n - q for n, q in zip(seq_lens, q_lens)]  # context already cached
    pre = plan_and_upload(planner, table, tables, [0] * len(old), old)
    n_old = pre.slot_mapping.shape[0]
    backend.write(torch.randn(n_old, HKV, D), torch.randn(n_old, HKV, D), kv, pre)
    qsl = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    ctx = plan_and_upload(planner, table, tables, old, q_lens)
    # the device block table holds every page of every sequence (sent once, in the first step)
    assert [row[: len(t)] for row, t in zip(ctx.block_tables.tolist(), tables)] == tables
    assert ctx.decode_part is not None
    small = [(n, q) for n, q in zip(seq_lens, q_lens) if q <= 16]
    rows = [n - q + i + 1 for n, q in small for i in range(q)]  # one causal row per token
    assert ctx.decode_part.seq_lens.tolist() == rows
    assert (ctx.extend_part is None) == (case == "all_small")
    t = qsl[-1]
    q, k, v = torch.randn(t, HQ, D), torch.randn(t, HKV, D), torch.randn(t, HKV, D)
    got = backend.forward(q, k, v, kv, ctx, scale=0.125)
    ref = paged_attention_extend_ref(
        q, kv.pages, ctx.block_tables, ctx.seq_lens, ctx.query_start_loc, kv.fmt, scale=0.125,
        sliding_window=window,
    )  # fmt: skip
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
