"""The Triton attention backend (kernels under TRITON_INTERPRET=1) against the torch backend over
a mixed step of a model whose layers have different page formats: one plan per (kernel,
format), reused by every later layer of that format, gives the reference's output."""

from __future__ import annotations

import torch

from sawkv.attention.torch_backend import TorchBackend
from sawkv.attention.triton_backend import TritonBackend
from sawkv.cache.kv_cache import LayerKV
from sawkv.engine.device_step import BlockTable
from sawkv.engine.step_inputs import StepPlanner
from sawkv.kernels import KVPages, PageFormat

BS, HKV, HQ, D, NUM_BLOCKS = 16, 2, 4, 64, 12
FORMATS = [
    PageFormat(4, D, HKV, BS, had_block=32, rotate_v=True),
    PageFormat(8, D, HKV, BS),
    PageFormat(4, D, HKV, BS, had_block=32, rotate_v=True),  # same format as layer 0
    PageFormat(4, D, HKV, BS, had_block=32, rotate_v=True, k_half_meta=True),  # keys per half
]


def test_planned_backend_matches_torch_backend_over_layers_of_mixed_formats(
    plan_and_upload, monkeypatch
):
    torch.manual_seed(0)
    ours, ref = TritonBackend(), TorchBackend()
    layers = [LayerKV(f.empty_pages(NUM_BLOCKS), f, torch.randn(HKV, D)) for f in FORMATS]
    ref_layers = [
        LayerKV(KVPages(*(t.clone() for t in kv.pages)), kv.fmt, kv.k_mean) for kv in layers
    ]
    tables, seq_lens, q_lens = [[3, 1, 7], [2, 5, 0, 4]], [40, 50], [1, 20]
    planner = StepPlanner(2, 4, BS, decode_threshold=ours.reorder_batch_threshold)
    table = BlockTable(2, 4, torch.device("cpu"))
    old = [n - q for n, q in zip(seq_lens, q_lens)]
    steps = [plan_and_upload(planner, table, tables, [0, 0], old)]
    steps.append(plan_and_upload(planner, table, tables, old, q_lens))
    steps.append(plan_and_upload(planner, table, tables, seq_lens, [1, 1]))  # decode only
    assert steps[1].decode_part is not None and steps[1].extend_part is not None
    assert steps[2].is_decode and not steps[1].is_decode
    group_paths = []
    write = ours._k.cache_write

    def spy(*args, group_path=True, **kwargs):
        group_paths.append(group_path)
        return write(*args, group_path=group_path, **kwargs)

    monkeypatch.setattr(ours._k, "cache_write", spy)
    for ctx in steps:
        n = ctx.slot_mapping.shape[0]
        ours.plan(ctx)
        for kv, kv_ref in zip(layers, ref_layers):
            q, k, v = torch.randn(n, HQ, D), torch.randn(n, HKV, D), torch.randn(n, HKV, D)
            got = ours.forward(q, k, v, kv, ctx, scale=0.125)
            want = ref.forward(q, k, v, kv_ref, ctx, scale=0.125)
            # each backend writes its own pages: the fused write may round a rotated value to
            # the neighbouring code (test_cache_write.py), ~1e-3 here; a wrong plan is O(1)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
    # the mixed step planned decode and extend once per distinct format: 3 formats x 2 kernels
    plans = [p for c in steps[1].parts() for key, p in c.plans.items() if key[0] != "write"]
    assert len(plans) == 6
    # decode steps write per token (no 16-token group can fill), prefill and mixed steps by group
    assert group_paths == [True] * 4 + [True] * 4 + [False] * 4
