"""Prometheus rendering of a stats snapshot."""

from __future__ import annotations

import pytest

from sawkv.server.metrics import parse_metrics, render_metrics


def test_render_parse_round_trip():
    stats = {
        "num_blocks_total": 100,
        "num_blocks_used": 25,
        "num_running": 3,
        "num_waiting": 1,
        "num_prompt_tokens_total": 500,
        "num_generation_tokens_total": 70,
        "generation_tokens_per_s": 12.5,
        "num_preemptions": 2,
        "prefix_cache_hit_tokens": 48,
        "kv_bytes_per_token": 4608,
        "kv_cache_dtype": "int4-bdr64",
    }
    text = render_metrics(stats, 'my"model')
    values = parse_metrics(text)
    assert values["sawkv_kv_blocks_used"] == 25
    assert values["sawkv_kv_blocks_free"] == 75  # derived: total - used
    assert values["sawkv_kv_cache_usage_ratio"] == 0.25
    assert values["sawkv_num_requests_running"] == 3 and values["sawkv_num_requests_waiting"] == 1
    assert values["sawkv_prompt_tokens_total"] == 500
    assert values["sawkv_generation_tokens_per_second"] == 12.5
    assert values["sawkv_engine_kv_bytes_per_token"] == 4608  # other numeric stats pass through
    assert "# TYPE sawkv_engine_kv_bytes_per_token gauge" in text
    # monotonic engine stats are counters, named *_total as Prometheus expects
    assert values["sawkv_engine_num_preemptions_total"] == 2
    assert values["sawkv_engine_prefix_cache_hit_tokens_total"] == 48
    assert "# TYPE sawkv_engine_num_preemptions_total counter" in text
    assert "# TYPE sawkv_engine_prefix_cache_hit_tokens_total counter" in text
    assert 'model_name="my\\"model"' in text  # label values escaped
    assert 'kv_cache_dtype="int4-bdr64"' in text
    assert "# TYPE sawkv_prompt_tokens_total counter" in text


def test_missing_stats_are_omitted_not_zeroed():
    values = parse_metrics(render_metrics({"num_running": 0}, "m"))
    assert values == {"sawkv_num_requests_running": 0}


def test_histograms_parse_with_prometheus_client():
    from prometheus_client.parser import text_string_to_metric_families

    from sawkv.engine.request_metrics import RequestMetrics

    class Seq:  # the fields RequestMetrics reads
        def __init__(self, arrival, scheduled, n):
            self.arrival_time, self.first_scheduled_time = arrival, scheduled
            self.first_token_time, self.output_ids = None, [0] * n

    rm = RequestMetrics()
    for arrival, scheduled, first, last, n in [
        (0.0, 0.5, 0.7, 3.7, 4),
        (1.0, 1.0, 1.015625, 1.015625, 1),
    ]:
        seq = Seq(arrival, scheduled, n)
        rm.first_token(seq, first)
        rm.finished(seq, last)
    text = render_metrics({"num_running": 0, "histograms": rm.snapshot()}, "m")
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    ttft = fams["sawkv_time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in ttft.samples}
    assert samples[("sawkv_time_to_first_token_seconds_count", None)] == 2
    assert samples[("sawkv_time_to_first_token_seconds_sum", None)] == pytest.approx(0.715625)
    assert samples[("sawkv_time_to_first_token_seconds_bucket", "0.02")] == 1  # 0.015625
    assert samples[("sawkv_time_to_first_token_seconds_bucket", "0.75")] == 2
    assert samples[("sawkv_time_to_first_token_seconds_bucket", "+Inf")] == 2
    queue = {s.name: s.value for s in fams["sawkv_request_queue_time_seconds"].samples}
    assert queue["sawkv_request_queue_time_seconds_sum"] == pytest.approx(0.5)
    tpot = {s.name: s.value for s in fams["sawkv_time_per_output_token_seconds"].samples}
    assert tpot["sawkv_time_per_output_token_seconds_count"] == 1  # one-token requests: none
    assert tpot["sawkv_time_per_output_token_seconds_sum"] == pytest.approx(1.0)
    e2e = {s.name: s.value for s in fams["sawkv_e2e_request_latency_seconds"].samples}
    assert e2e["sawkv_e2e_request_latency_seconds_sum"] == pytest.approx(3.7 + 0.015625)
    # the plain parser keeps _sum / _count and the +Inf bucket
    assert parse_metrics(text)["sawkv_time_to_first_token_seconds_count"] == 2
