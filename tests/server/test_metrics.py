"""Prometheus rendering of a stats snapshot."""

from __future__ import annotations

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
