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
