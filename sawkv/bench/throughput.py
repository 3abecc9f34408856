"""Offline throughput: the serving workload through :class:`LLMEngine` in process (no HTTP).

Like ``vllm bench throughput``, but with the same client discipline as ``sawkv bench serve``:
at most ``concurrency`` requests in the engine, a new one added as soon as one finishes, so an
``offline`` row and an ``http`` row of one workload differ only by the server's overhead. Only
public engine API is used: ``add_request``, ``step`` and the step profiler
(``start_profile`` / ``stop_profile``), whose breakdown goes into the row.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable

from sawkv.bench.metrics import RequestResult, engine_histograms, server_means, summarize
from sawkv.engine.llm_engine import LLMEngine
from sawkv.engine.sampling_params import SamplingParams

_ids = itertools.count()


def build_engine(model: str, kv_cache_dtype: str = "auto", **kwargs) -> LLMEngine:
    """An engine for benchmarking; prefix caching off unless asked (random prompts share
    nothing, and a benchmark should not hit pages a warm-up left behind)."""
    kwargs.setdefault("enable_prefix_caching", False)
    return LLMEngine.from_args(model, kv_cache_dtype=kv_cache_dtype, **kwargs)


def warm_up(engine: LLMEngine, prompt: list[int]) -> None:
    """One short request to completion: compiles, autotunes and touches every code path once."""
    rid = f"warmup-{next(_ids)}"
    engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()


def run_offline(
    engine: LLMEngine,
    prompts: list[list[int]],
    output_len: int,
    concurrency: int,
    *,
    on_done: Callable[[], None] | None = None,
    warmup: bool = True,
    detokenize: bool = True,
    **labels,
) -> dict:
    """Run every prompt (greedy, ``ignore_eos``, ``output_len`` tokens), ``concurrency`` at a
    time; ``detokenize`` turns each token into text in the engine, as ``LLMEngine.generate``
    does (``False``: token ids only, as the server's requests). Returns a
    :func:`sawkv.bench.metrics.summarize` row with ``mode="offline"``, the workload labels,
    ``detokenize``, KV capacity and the step breakdown (host vs device, per step kind)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if engine.has_unfinished_requests():
        raise RuntimeError("the engine has unfinished requests: run_offline needs it idle")
    if warmup:
        warm_up(engine, prompts[0][: min(len(prompts[0]), 16)])
    params = SamplingParams(
        temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=detokenize
    )
    pending = deque(enumerate(prompts))
    results = [RequestResult(len(p)) for p in prompts]
    sent: dict[str, tuple[int, float, float]] = {}  # request id -> (index, sent at, last token)
    stats0 = engine.stats()
    preemptions0, hist0 = stats0["num_preemptions"], engine_histograms(stats0)
    engine.start_profile()
    start = time.perf_counter()
    while pending or sent:
        while pending and len(sent) < concurrency:
            i, prompt = pending.popleft()
            rid = f"bench-{next(_ids)}"
            engine.add_request(rid, prompt, params)
            now = time.perf_counter()
            sent[rid] = (i, now, now)
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            i, t_sent, t_last = sent[out.request_id]
            r = results[i]
            if r.num_output_tokens == 0:
                r.ttft_s = now - t_sent
            else:
                r.itl_s.append(now - t_last)
            r.num_output_tokens += len(out.new_token_ids)
            sent[out.request_id] = (i, t_sent, now)
            if out.finished:
                r.latency_s = now - t_sent
                del sent[out.request_id]
                if on_done is not None:
                    on_done()
    duration = time.perf_counter() - start
    breakdown = engine.stop_profile()
    stats = engine.stats()
    capacity = stats["num_blocks_total"] * stats["block_size"]
    seq_len = len(prompts[0]) + output_len
    row = summarize(
        results, duration, mode="offline", method=labels.pop("method", engine.spec.method.name),
        input_len=len(prompts[0]), output_len=output_len,
        concurrency=concurrency, num_requests=len(prompts), **labels,
    )  # fmt: skip
    row.update(
        kv_capacity_tokens=capacity,
        max_concurrent_seqs=capacity // seq_len,
        num_preemptions=stats["num_preemptions"] - preemptions0,
        detokenize=detokenize,
        step_breakdown=breakdown,
        # the engine's own request times (as a server's /metrics has them): TTFT split into
        # queueing and prefill
        **server_means(hist0, engine_histograms(stats)),
    )
    return row
