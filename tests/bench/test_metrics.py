"""Benchmark rows: summary statistics against hand-computed values, prompt generators, merging."""

from __future__ import annotations

import pytest

from sawkv.bench.datasets import random_prompts, text_prompts
from sawkv.bench.metrics import RequestResult, summarize
from sawkv.bench.report import merge_runs
from sawkv.bench.serve import _chunk_tokens, arrival_times


def test_summarize_by_hand():
    a = RequestResult(10, 3, ttft_s=0.5, latency_s=1.5, itl_s=[0.5, 0.5])  # tpot 0.5 s
    b = RequestResult(10, 5, ttft_s=1.0, latency_s=2.0, itl_s=[0.25] * 4)  # tpot 0.25 s
    bad = RequestResult(10, error="HTTP 500: boom")
    row = summarize([a, b, bad], 4.0, mode="http", concurrency=2)
    assert list(row)[:2] == ["mode", "concurrency"]  # labels lead the row
    assert row["errors"] == 1 and row["num_completed"] == 2
    assert row["error_samples"] == ["HTTP 500: boom"]
    assert row["output_tok_s"] == 8 / 4.0 and row["total_tok_s"] == 28 / 4.0
    assert row["request_s"] == 0.5
    assert row["ttft_s"]["mean"] == 0.75 and row["ttft_s"]["p50"] == 0.75
    assert row["tpot_ms"]["mean"] == pytest.approx(375.0)
    # numpy's linear interpolation over ITL gaps [250 x4, 500 x2]: p90 at rank 4.5
    assert row["itl_ms"]["p90"] == pytest.approx(500.0)
    assert row["itl_ms"]["p50"] == pytest.approx(250.0)
    with pytest.raises(ValueError, match="duration_s"):
        summarize([a], 0.0)


def test_one_token_request_has_no_tpot():
    row = summarize([RequestResult(4, 1, ttft_s=0.1, latency_s=0.1)], 1.0)
    assert row["tpot_ms"]["p50"] is None and row["ttft_s"]["p50"] == 0.1


def test_chunk_token_counting():
    assert _chunk_tokens({"choices": [{"text": "ab", "token_ids": [1, 2, 3]}]}) == (3, None)
    assert _chunk_tokens({"choices": [{"text": "ab"}]}) == (1, None)
    assert _chunk_tokens({"choices": [{"text": ""}]}) == (0, None)
    assert _chunk_tokens({"choices": [{"delta": {"content": "x"}}]}) == (1, None)
    assert _chunk_tokens({"choices": [], "usage": {"completion_tokens": 7}}) == (0, 7)


def test_prompts_have_exact_length_and_differ():
    ps = random_prompts(5, 33, token_range=(10, 20), seed=1)
    assert [len(p) for p in ps] == [33] * 5 and all(10 <= t < 20 for p in ps for t in p)
    assert len({tuple(p) for p in ps}) == 5
    assert ps == random_prompts(5, 33, token_range=(10, 20), seed=1)
    text = list(range(100))
    ws = text_prompts(text, 4, 30, seed=0)
    assert all(w == list(range(w[0], w[0] + 30)) for w in ws)  # consecutive windows
    with pytest.raises(ValueError, match="fewer than input_len"):
        text_prompts(text, 1, 101)
    with pytest.raises(ValueError, match="low < high"):
        random_prompts(1, 1, token_range=(5, 5))


def test_merge_runs_replaces_same_key():
    old = [{"mode": "http", "method": "bf16", "input_len": 1, "output_len": 2, "concurrency": 1,
            "x": 0}]  # fmt: skip
    new = [dict(old[0], x=1), dict(old[0], concurrency=4, x=2)]
    merged = merge_runs(old, new)
    assert [r["x"] for r in merged] == [1, 2]


def test_arrival_times():
    assert arrival_times(3, float("inf")) == [0.0, 0.0, 0.0]
    times = arrival_times(4000, 50.0, seed=1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and min(gaps) >= 0
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.05)  # exponential, mean 1/rate
    with pytest.raises(ValueError, match="positive"):
        arrival_times(1, 0.0)


def _row(method, in_len, out_len, c, tok_s):
    pct = {"p50": 0.1, "p90": 0.2, "p99": 0.3}
    return {"mode": "http", "method": method, "input_len": in_len, "output_len": out_len,
            "concurrency": c, "output_tok_s": tok_s, "ttft_s": pct, "tpot_ms": pct}  # fmt: skip


def test_plot_keeps_each_method_color_across_workloads():
    """A workload only one method ran must not draw it in another method's color."""
    from sawkv.bench.report import runs_figure

    rows = [_row("bf16", 256, 1024, 16, 1.0), _row("int4", 256, 1024, 16, 2.0),
            _row("int4", 1024, 4096, 256, 3.0)]  # fmt: skip
    fig = runs_figure(rows)
    colors: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colors.setdefault(line.get_label(), set()).add(line.get_color())
        if ax.get_title():  # the top panel of each column names its lines
            labels = {t.get_text() for t in ax.get_legend().get_texts()}
            assert labels == {line.get_label() for line in ax.get_lines()}
    assert set(colors) == {"bf16 (http)", "int4 (http)"}
    assert all(len(c) == 1 for c in colors.values())
    assert colors["bf16 (http)"] != colors["int4 (http)"]
