"""Async scheduling (step N planned while step N-1's samples are still on the device) against
the synchronous engine: the same requests give the same tokens and finish reasons, through
stops on a token's value (seen one step late), length limits, prefix-cache hits, preemption
by recompute and aborts. A CPU engine is batch invariant, so the extra step a stopped request
runs under async scheduling changes nobody else's numerics."""

from __future__ import annotations

import pytest

from sawkv import SamplingParams
from sawkv.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def model_dir(tiny_qwen3):
    return tiny_qwen3(vocab_size=500)


def engine(model_dir, async_scheduling, **kw):
    kw.setdefault("num_gpu_blocks", 64)
    return LLMEngine.from_args(
        model_dir, "int4-bdr32", load_format="dummy", max_model_len=160, block_size=16,
        async_scheduling=async_scheduling, **kw,
    )  # fmt: skip


def prompts(n, length=20):
    return [[1 + (7 * i + 3 * j) % 450 for j in range(length + 3 * i)] for i in range(n)]


def drive(eng, requests, abort_at=None):
    """Run to completion; returns {request id: (tokens, finish reason)} and checks that each
    request's streamed new tokens add up to its final output."""
    for rid, ids, params in requests:
        eng.add_request(rid, ids, params)
    streamed, done, steps = {}, {}, 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                assert streamed[out.request_id] == out.output_token_ids
                done[out.request_id] = (list(out.output_token_ids), out.finish_reason)
        steps += 1
        if abort_at is not None and steps == abort_at[1]:
            eng.abort_request(abort_at[0])
        assert steps < 1000
    assert not eng.seqs and eng.block_manager.num_used_blocks == 0
    return done


def test_same_tokens_and_reasons_as_sync(model_dir):
    greedy = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 5, 12)]
    reqs = [(f"r{i}", p, greedy[i % 3]) for i, p in enumerate(prompts(6))]
    ref = drive(engine(model_dir, False), reqs)
    # stop on a token's value: each request's 3rd token (stops at its first occurrence)
    stops = [
        (rid, ids, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ref[rid][0][2]]))
        for rid, ids, p in reqs
        if p.max_tokens == 12
    ]
    seeded = [(f"s{i}", p, SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=7))
              for i, p in enumerate(prompts(3, 9))]  # fmt: skip
    all_reqs = reqs + [(rid + "-stop", ids, p) for rid, ids, p in stops] + seeded
    want = drive(engine(model_dir, False), all_reqs)
    got = drive(engine(model_dir, True), all_reqs)
    assert got == want
    assert any(reason == "stop" for _, reason in got.values())


def test_prefix_cache_preemption_and_abort(model_dir):
    shared = [5 + (j * 11) % 400 for j in range(40)]
    reqs = [(f"p{i}", shared + [10 + i] * (i + 1), SamplingParams(temperature=0, max_tokens=30,
             ignore_eos=True)) for i in range(5)]  # fmt: skip
    # 14 pages for 5 requests of up to 75 tokens: running out forces preemption by recompute
    kw = dict(num_gpu_blocks=14, enable_prefix_caching=True)
    want = drive(engine(model_dir, False, **kw), reqs)
    eng = engine(model_dir, True, **kw)
    got = drive(eng, reqs)
    assert got == want
    stats = eng.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    # abort one request mid-way: the others are unaffected, its pages come back
    want = drive(engine(model_dir, False, **kw), reqs, abort_at=("p2", 6))
    got = drive(engine(model_dir, True, **kw), reqs, abort_at=("p2", 6))
    assert "p2" not in got and got == {k: v for k, v in want.items() if k != "p2"}


def test_async_scheduling_refuses_tensor_parallelism():
    from sawkv.config import EngineConfig

    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig.from_args("qwen3-8b", async_scheduling=True, tensor_parallel_size=2)


def test_async_scheduling_default_is_on_for_one_gpu_only():
    """Unset, async scheduling is on for a CUDA engine of one rank and off on the CPU (nothing
    to overlap) and with tensor parallelism (unsupported); an explicit value always wins."""
    from sawkv.config import EngineConfig

    def resolved(**kw):
        return EngineConfig.from_args("qwen3-8b", **kw).is_async_scheduling

    assert resolved(device="cuda") is True
    assert resolved(device="cpu") is False
    assert resolved(device="cuda", tensor_parallel_size=2) is False
    assert resolved(device="cuda", async_scheduling=False) is False
    assert resolved(device="cpu", async_scheduling=True) is True


def test_offline_benchmark_with_async_scheduling(model_dir):
    """``sawkv bench throughput --async-scheduling``'s loop: every request gets its tokens and
    the step breakdown still covers every step kind that ran."""
    from sawkv.bench.throughput import run_offline

    eng = engine(model_dir, True, enable_prefix_caching=False)
    row = run_offline(eng, prompts(6), output_len=9, concurrency=4)
    assert row["num_requests"] == 6 and row["errors"] == 0
    assert row["output_tok_s"] > 0
    steps = row["step_breakdown"]
    assert {"prefill", "decode"} <= set(steps) or {"mixed", "decode"} <= set(steps)
    assert all(v["steps"] > 0 and v["wall_ms"] > 0 for v in steps.values())
