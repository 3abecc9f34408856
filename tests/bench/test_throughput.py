"""``sawkv bench throughput`` on a tiny dummy Qwen3 (CPU): the row's counts against the
workload's arithmetic, and the step breakdown against the tokens the steps must have run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sawkv.bench.datasets import random_prompts
from sawkv.bench.throughput import build_engine, run_offline
from sawkv.cli import app

ENGINE = dict(load_format="dummy", num_gpu_blocks=16, block_size=16, max_model_len=128,
              max_num_batched_tokens=64, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tiny_qwen3):
    return tiny_qwen3()


@pytest.mark.parametrize("concurrency", [1, 3])
def test_offline_row_and_step_breakdown(tiny_dir, concurrency):
    engine = build_engine(tiny_dir, "int4-bdr32", **ENGINE)
    n, il, ol = 5, 40, 6
    prompts = random_prompts(n, il, token_range=(0, 512), seed=concurrency)
    row = run_offline(engine, prompts, ol, concurrency, method="m")
    assert (row["mode"], row["method"], row["concurrency"], row["num_requests"]) == (
        "offline", "m", concurrency, n)  # fmt: skip
    assert row["errors"] == 0 and row["num_completed"] == n
    assert row["total_output_tokens"] == n * ol and row["total_input_tokens"] == n * il
    assert row["kv_capacity_tokens"] == 16 * 16 and row["max_concurrent_seqs"] == 256 // 46
    steps = row["step_breakdown"]
    # every prompt token is prefilled once and every output token but the last is fed back
    tokens = sum(b["steps"] * b["tokens_per_step"] for b in steps.values())
    assert round(tokens) == n * (il + ol - 1)
    assert max(b["seqs_per_step"] for b in steps.values()) <= concurrency
    for b in steps.values():
        assert b["wall_ms"] == pytest.approx(b["device_ms"] + b["host_ms"])
        assert b["device_ms"] > 0 and 0 <= b["host_frac"] < 1
    # the engine's own request times sit inside the bench's (it stamps after step() returns;
    # 1 ms for the stamps around add_request, which come in the other order)
    assert 0 < row["server_ttft_mean_s"] <= row["ttft_s"]["mean"] + 1e-3
    assert 0 < row["server_e2e_mean_s"] <= row["e2el_ms"]["mean"] / 1e3 + 1e-3
    assert row["server_queue_mean_s"] + row["server_prefill_mean_s"] == pytest.approx(
        row["server_ttft_mean_s"], rel=1e-9
    )
    if concurrency == 1:  # one at a time: the requests' latencies tile the run
        assert set(steps) == {"prefill", "decode"}
        assert steps["prefill"]["steps"] == n  # a 40-token prompt fits the 64-token budget
        assert row["e2el_ms"]["mean"] * n <= row["duration_s"] * 1e3


def test_cli_throughput_writes_offline_rows(tiny_dir, tmp_path):
    out = tmp_path / "off.json"
    args = ["bench", "throughput", "--model", tiny_dir, "--load-format", "dummy", "--device",
            "cpu", "--kv-cache-dtype", "bf16", "--input-len", "16", "--output-len", "4",
            "--concurrency", "2", "--num-requests", "2", "--num-gpu-blocks", "32",
            "--max-model-len", "64", "--json", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    (row,) = json.loads(out.read_text())["runs"]
    assert row["mode"] == "offline" and row["method"] == "bf16" and row["errors"] == 0
    assert row["total_output_tokens"] == 8
    bad = CliRunner().invoke(app, args[:-2] + ["--kv-cache-dtype", "int5"])
    assert bad.exit_code != 0 and "int5" in bad.output
