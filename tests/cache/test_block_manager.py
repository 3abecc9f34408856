"""Block manager: allocation accounting, prefix-cache hits, reference counts, eviction order."""

from __future__ import annotations

import pytest

from sawkv.cache.block_manager import BlockManager
from sawkv.cache.kv_cache import KVCacheSpec, parse_servable_method
from sawkv.engine.sampling_params import SamplingParams
from sawkv.engine.sequence import Sequence


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams())


def computed(bm, s, n):
    assert bm.ensure_slots(s, n)
    s.num_computed_tokens = n
    bm.register_full_blocks(s)


def test_allocate_and_free_counts():
    bm = BlockManager(10, 4, True)
    s = seq(range(9))
    assert bm.ensure_slots(s, 9)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 7
    assert not bm.ensure_slots(
        seq(range(100), "big"), 100
    )  # needs 25 pages: refused, nothing taken
    assert bm.num_free_blocks == 7
    bm.free(s)
    assert bm.num_free_blocks == 10 and s.block_table == []


def test_prefix_hit_shares_pages_and_leaves_one_token():
    bm = BlockManager(16, 4, True)
    a = seq(list(range(10)), "a")
    computed(bm, a, 10)  # pages 0-1 full and hashed, page 2 partial
    b = seq(list(range(8)) + [99, 98, 97], "b")
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2]
    c = seq(list(range(8)), "c")  # whole prompt cached: the last page is recomputed
    assert bm.match_prefix(c) == 4
    d = seq([5] + list(range(1, 8)), "d")  # first page differs: no hit on the second either
    assert bm.match_prefix(d) == 0


def test_freed_cached_pages_still_hit_until_reused():
    bm = BlockManager(4, 4, True)
    a = seq(range(9), "a")
    computed(bm, a, 9)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = seq(range(9), "b")
    assert bm.match_prefix(b) == 8  # pages came back from the free list
    assert bm.num_free_blocks == 2
    bm.free(b)
    # reuse all pages for other tokens: the cached prefix is evicted
    x = seq([7] * 16, "x")
    assert bm.ensure_slots(x, 16)
    assert bm.match_prefix(seq(range(9), "c")) == 0


def test_prefix_caching_disabled():
    bm = BlockManager(8, 4, False)
    a = seq(range(9), "a")
    computed(bm, a, 9)
    assert bm.match_prefix(seq(range(9), "b")) == 0


def test_page_size_bytes():
    # INT4 at d=128: 64 B codes + 4 B meta per token x head, K and V
    spec = KVCacheSpec(parse_servable_method("int4-bdr128", 128), 36, 8, 128, 16, None)
    assert spec.page_size_bytes == 2 * 8 * 16 * 68
    bf16 = KVCacheSpec(parse_servable_method("bf16", 128), 36, 8, 128, 16, None)
    assert bf16.page_size_bytes == 2 * 8 * 16 * 256
    assert bf16.page_size_bytes / spec.page_size_bytes == pytest.approx(3.76, abs=0.01)
    int8 = KVCacheSpec(parse_servable_method("int8", 128), 36, 8, 128, 16, None)
    assert int8.page_size_bytes == 2 * 8 * 16 * 132


@pytest.mark.parametrize("name", ["int3", "int4-g32", "fp8", "int2-bdr64"])
def test_evaluation_only_methods_refused(name):
    with pytest.raises(ValueError, match="evaluation-only"):
        parse_servable_method(name, 128)


def test_unknown_method_refused():
    with pytest.raises(ValueError, match="unknown KV cache method"):
        parse_servable_method("int5-bdr", 128)


def test_first_pages_come_from_their_own_range():
    """With attention sinks, a sequence's first page is one of pages 0..F-1 (its id is the
    sink row) and no other page is; a prefix hit shares the first page, and with it the row."""
    bm = BlockManager(10, 4, True, num_first_blocks=2)
    a, b, c = seq(range(9), "a"), seq(range(20, 29), "b"), seq(range(40, 45), "c")
    assert bm.ensure_slots(a, 9) and bm.ensure_slots(b, 9)
    assert a.block_table[0] < 2 and b.block_table[0] < 2
    assert all(i >= 2 for i in a.block_table[1:] + b.block_table[1:])
    # both first pages are taken: a third sequence waits although 4 other pages are free
    assert bm.num_free_blocks == 4 and not bm.ensure_slots(c, 5) and c.block_table == []
    bm.free(a)
    assert bm.ensure_slots(c, 5) and c.block_table[0] < 2
    bm.free(b)
    bm.free(c)
    d = seq(range(9), "d")
    computed(bm, d, 9)
    e = seq(list(range(8)) + [7, 7], "e")
    assert bm.match_prefix(e) == 8 and e.block_table[0] == d.block_table[0] < 2
    with pytest.raises(ValueError, match="num_first_blocks"):
        BlockManager(4, 4, True, num_first_blocks=4)


def test_sink_writes_pick_the_first_positions_of_first_pages():
    import numpy as np

    from sawkv.engine.device_step import sink_writes

    # block 16, 2 first pages, 4 sinks: page 1 offsets 0-5 (a prefill), page 0 offset 3 (a
    # decode of a 4th token), page 5 offset 0 (not a first page), -1 (padding)
    slots = np.array([16, 17, 18, 19, 20, 21, 3, 80, -1])
    src, dst = sink_writes(slots, 16, 2, 4)
    assert src.tolist() == [0, 1, 2, 3, 6]
    assert dst.tolist() == [4, 5, 6, 7, 3]
