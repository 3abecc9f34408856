"""A mixed step (one-token sequences + a prefill chunk) split into decode and extend kernels
gives the same attention as one extend call over the whole batch (torch backend)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sawkv.attention.backend import LayerKV
from sawkv.attention.reference import paged_attention_extend_ref
from sawkv.attention.torch_backend import TorchBackend
from sawkv.engine.model_runner import ModelRunner


@pytest.mark.parametrize("bits,had_block", [(16, 0), (4, 32), (8, 0)])
def test_split_step_equals_single_extend(bits, had_block):
    torch.manual_seed(0)
    bs, hkv, hq, d, num_blocks = 4, 2, 4, 64, 16
    page_dim = d // 2 if bits == 4 else d
    dtype = torch.float32 if bits == 16 else torch.uint8
    kv = LayerKV(
        torch.zeros(num_blocks, hkv, bs, page_dim, dtype=dtype),
        torch.zeros(num_blocks, hkv, bs, page_dim, dtype=dtype),
        None if bits == 16 else torch.zeros(num_blocks, hkv, bs, 2, dtype=torch.float16),
        None if bits == 16 else torch.zeros(num_blocks, hkv, bs, 2, dtype=torch.float16),
        None,
    )
    backend = TorchBackend(bits=bits, had_block=had_block, rotate_v=False)
    tables = [[3, 1, 7], [2, 5], [0, 4]]  # two decoding sequences first, then a prefill chunk
    seq_lens, q_lens = [9, 5, 7], [1, 1, 4]
    # earlier context of every sequence already in the pages
    old = [list(range(n - q)) for n, q in zip(seq_lens, q_lens)]
    fake = SimpleNamespace(spec=SimpleNamespace(block_size=bs), device=torch.device("cpu"))
    fake._split = ModelRunner._split
    pre = ModelRunner._context(fake, old, tables, [len(p) for p in old],
                               [0, *torch.tensor([len(p) for p in old]).cumsum(0).tolist()],
                               is_decode=False)  # fmt: skip
    n_old = pre.slot_mapping.shape[0]
    backend.write(torch.randn(n_old, hkv, d), torch.randn(n_old, hkv, d), kv, pre)
    new = [list(range(n - q, n)) for n, q in zip(seq_lens, q_lens)]
    qsl = [0, 1, 2, 6]
    ctx = ModelRunner._context(fake, new, tables, seq_lens, qsl, is_decode=False)
    assert ctx.decode_part is not None and ctx.decode_part.seq_lens.tolist() == [9, 5]
    assert ctx.extend_part.query_start_loc.tolist() == [0, 4]
    q, k, v = torch.randn(6, hq, d), torch.randn(6, hkv, d), torch.randn(6, hkv, d)
    got = backend.forward(q, k, v, kv, ctx, scale=0.125)
    ref = paged_attention_extend_ref(
        q, kv.k_cache, kv.v_cache, kv.k_meta, kv.v_meta, ctx.block_tables, ctx.seq_lens,
        ctx.query_start_loc, scale=0.125, bits=bits, had_block=had_block, rotate_v=False,
    )  # fmt: skip
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
