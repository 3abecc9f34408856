"""Request latency histograms: bucket counts against a direct count, and the engine's queue /
prefill / first-token / last-token times on a step clock, where every value is known."""

from __future__ import annotations

import math
import random

import pytest

from sawkv import SamplingParams
from sawkv.engine import request_metrics
from sawkv.engine.llm_engine import LLMEngine
from sawkv.engine.request_metrics import LATENCY_BUCKETS, Histogram


def test_histogram_buckets_match_a_direct_count():
    rng = random.Random(0)
    xs = [rng.choice([0.0, 0.1, 1.0, 7.5]) if rng.random() < 0.3 else rng.expovariate(0.5)
          for _ in range(500)]  # fmt: skip
    xs += [1e6]  # above every bound: only in +Inf
    h = Histogram(LATENCY_BUCKETS)
    for x in xs + [math.nan, math.inf, -1.0]:  # dropped, not summed
        h.observe(x)
    snap = h.snapshot()
    assert snap["count"] == len(xs)
    assert snap["sum"] == pytest.approx(sum(xs))
    for le, cumulative in snap["buckets"][:-1]:
        assert cumulative == sum(1 for x in xs if x <= le), le  # a bound is inclusive
    assert snap["buckets"][-1] == ["+Inf", len(xs)]


@pytest.fixture(scope="module")
def model_dir(tiny_qwen3):
    return tiny_qwen3(vocab_size=500)


def run(model_dir, monkeypatch, async_scheduling, max_tokens, max_num_seqs=1):
    """Submit every request at t=0 and step to completion; the clock reads the step index."""
    clock = {"t": 0.0}
    monkeypatch.setattr(request_metrics, "now", lambda: clock["t"])
    eng = LLMEngine.from_args(
        model_dir, "int4-bdr32", load_format="dummy", max_model_len=128, block_size=16,
        num_gpu_blocks=32, max_num_seqs=max_num_seqs, async_scheduling=async_scheduling,
    )  # fmt: skip
    for i, m in enumerate(max_tokens):
        prompt = [1 + (5 * i + j) % 400 for j in range(12)]
        eng.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=m,
                                                        ignore_eos=True))  # fmt: skip
    step = 0
    while eng.has_unfinished_requests():
        clock["t"] = float(step)
        eng.step()
        step += 1
        assert step < 200
    return eng.stats()["histograms"]


def upper_bounds(hist) -> list[float]:
    """Each observation's bucket: the smallest bound at or above it."""
    out, prev = [], 0
    for le, cumulative in hist["buckets"]:
        out += [0.0 if le == "+Inf" else float(le)] * (cumulative - prev)
        prev = cumulative
    return out


def test_sync_engine_times_on_a_step_clock(model_dir, monkeypatch):
    # one sequence at a time: r0 runs steps 0-2, r1 waits and runs 3-7, r2 runs 8-8
    h = run(model_dir, monkeypatch, False, [3, 5, 1])
    assert h["request_queue_time_seconds"]["sum"] == 0 + 3 + 8
    assert h["request_prefill_time_seconds"]["sum"] == 0  # prefill and first token: one step
    assert h["time_to_first_token_seconds"]["sum"] == 0 + 3 + 8
    assert h["e2e_request_latency_seconds"]["sum"] == 2 + 7 + 8
    # per request (last - first) / (n - 1): r0 (2 - 0) / 2, r1 (7 - 3) / 4; r2 has one token
    assert h["time_per_output_token_seconds"]["count"] == 2
    assert h["time_per_output_token_seconds"]["sum"] == 2.0
    assert upper_bounds(h["e2e_request_latency_seconds"]) == [2.5, 7.5, 10.0]  # 2, 7, 8 s
    assert all(h[k]["count"] == 3 for k in h if not k.startswith("time_per"))


def test_async_engine_hands_tokens_out_a_step_later(model_dir, monkeypatch):
    sync = run(model_dir, monkeypatch, False, [4, 2, 6], max_num_seqs=3)
    asyn = run(model_dir, monkeypatch, True, [4, 2, 6], max_num_seqs=3)
    for h in (sync, asyn):
        assert h["time_to_first_token_seconds"]["count"] == 3
        assert h["request_queue_time_seconds"]["sum"] == 0  # all three admitted at once
        # TTFT = queue + prefill, request by request
        assert h["time_to_first_token_seconds"]["sum"] == pytest.approx(
            h["request_queue_time_seconds"]["sum"] + h["request_prefill_time_seconds"]["sum"]
        )
    assert sync["time_to_first_token_seconds"]["sum"] == 0
    # a sampled token reaches the engine's output one step after its step ran
    assert asyn["time_to_first_token_seconds"]["sum"] == 3
    assert (
        asyn["e2e_request_latency_seconds"]["sum"] == sync["e2e_request_latency_seconds"]["sum"] + 3
    )
