"""``sawkv bench serve`` over real HTTP against a real CPU ``sawkv serve smollm2-135m``.

The client's own counts are checked against the server's: ``/metrics`` token counters must
grow by exactly what the JSON row says was sent and received (warm-up included).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sawkv.cli import app
from tests.bench.conftest import KV_CACHE_DTYPE, metric

IN, OUT, CONC, NUM = 24, 5, 4, 4


def test_bench_serve_row_matches_server_counters(smollm2_server, tmp_path):
    base = smollm2_server
    prompt0 = metric(base, "sawkv_prompt_tokens_total")
    gen0 = metric(base, "sawkv_generation_tokens_total")
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    args = ["bench", "serve", "--base-url", base, "--input-len", str(IN), "--output-len",
            str(OUT), "--concurrency", f"1,{CONC}", "--num-requests", str(NUM),
            "--request-rate", "100", "--json",
            str(out_json), "--plot", str(out_png)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    runs = json.loads(out_json.read_text())["runs"]
    assert [r["concurrency"] for r in runs] == [1, CONC]
    warmup_out = min(OUT, 4)  # one untimed request of IN prompt tokens
    assert metric(base, "sawkv_prompt_tokens_total") - prompt0 == IN * (2 * NUM + 1)
    assert metric(base, "sawkv_generation_tokens_total") - gen0 == OUT * 2 * NUM + warmup_out
    for r in runs:
        assert r["mode"] == "http" and r["method"] == KV_CACHE_DTYPE
        assert (r["input_len"], r["output_len"], r["num_requests"]) == (IN, OUT, NUM)
        assert r["request_rate"] == 100
        capacity = metric(base, "sawkv_kv_blocks_total") * metric(base, "sawkv_engine_block_size")
        assert r["kv_capacity_tokens"] == capacity and r["max_concurrent_seqs"] == capacity // 29
        assert r["errors"] == 0 and r["num_completed"] == NUM
        # ignore_eos: every request produced exactly OUT tokens
        assert r["total_output_tokens"] == NUM * OUT and r["total_input_tokens"] == NUM * IN
        assert abs(r["output_tok_s"] * r["duration_s"] - NUM * OUT) < 1e-6
        assert abs(r["total_tok_s"] * r["duration_s"] - NUM * (IN + OUT)) < 1e-6
        for name in ("ttft_s", "tpot_ms", "itl_ms", "e2el_ms"):
            p = r[name]
            assert 0 < p["p50"] <= p["p90"] <= p["p99"], (name, p)
        # a request's first token comes before its last; its latency fits in the run
        assert r["ttft_s"]["p99"] * 1e3 < r["e2el_ms"]["p99"] <= r["duration_s"] * 1e3
        # the server's histograms (/metrics) saw exactly this level's requests: each one's
        # engine-side times lie inside the client's, and TTFT = queue + prefill
        assert 0 < r["server_ttft_mean_s"] < r["ttft_s"]["mean"]
        assert 0 < r["server_e2e_mean_s"] < r["e2el_ms"]["mean"] / 1e3
        assert r["server_queue_mean_s"] >= 0 and r["server_prefill_mean_s"] > 0
        assert r["server_queue_mean_s"] + r["server_prefill_mean_s"] == pytest.approx(
            r["server_ttft_mean_s"], rel=1e-9
        )
    # one at a time, requests do not wait for each other: lower latency than 4 at a time
    assert runs[0]["e2el_ms"]["p50"] < runs[1]["e2el_ms"]["p50"]
    assert out_png.stat().st_size > 0


def test_bench_serve_counts_server_errors(smollm2_server, tmp_path):
    """A prompt longer than the server's max_model_len (256) is refused with HTTP 400: every
    request is an error and no throughput is claimed for it."""
    out_json = tmp_path / "err.json"
    args = ["bench", "serve", "--base-url", smollm2_server, "--input-len", "300",
            "--output-len", "4", "--num-requests", "3", "--warmup", "0", "--json",
            str(out_json)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    (row,) = json.loads(out_json.read_text())["runs"]
    assert row["errors"] == 3 and row["num_completed"] == 0 and row["output_tok_s"] == 0
    assert "HTTP 400" in row["error_samples"][0] and "context length" in row["error_samples"][0]


def test_bench_serve_unreachable_server_fails_clearly(tmp_path):
    res = CliRunner().invoke(app, ["bench", "serve", "--base-url", "http://127.0.0.1:9/v1",
                                   "--num-requests", "1"])  # fmt: skip
    assert res.exit_code == 1
    assert "cannot reach http://127.0.0.1:9/v1" in res.output
