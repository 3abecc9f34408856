"""``sawkv`` CLI: help is fast and import-light; ``eval`` runs end to end on a tiny window."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from sawkv.cli import app
from sawkv.models.hub import cache_dir, resolve_model_dir


def test_help_lists_eval_without_heavy_imports():
    code = "import sys; from sawkv.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0 and "eval" in res.output


def test_eval_end_to_end(tmp_path, monkeypatch):
    real = cache_dir()
    model_dir = str(resolve_model_dir("smollm2-135m"))
    root = tmp_path / "cache"  # private key-means dir; texts shared with the real cache
    root.mkdir()
    (root / "data").symlink_to(real / "data")
    monkeypatch.setenv("SAWKV_CACHE", str(root))
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    args = [
        "eval",
        "--model",
        model_dir,
        "--methods",
        "auto,int4,int4-bdr64-kc,int4-bdr64-kc@prefill",
        "--tokens",
        "128",
        "--window",
        "64",
        "--calib-tokens",
        "128",
        "--json",
        str(out_json),
        "--plot",
        str(out_png),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(out_json.read_text())
    labels = [r["label"] for r in data["results"]]
    assert labels == ["auto", "int4", "int4-bdr64-kc", "int4-bdr64-kc@prefill"]
    assert all(r["num_tokens"] == 2 * 63 and r["ppl"] > 1 for r in data["results"])
    assert data["results"][1]["bits_per_element"] == 4.5 and "delta_pct" in data["results"][1]
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert list(root.glob("*/k_means.safetensors"))  # calibrated on first use of static -kc
    assert "perplexity" in res.output

    # --resume reuses every stored result: nothing is recomputed
    res = CliRunner().invoke(app, args + ["--resume"])
    assert res.exit_code == 0, res.output
    again = json.loads(out_json.read_text())
    assert [r["seconds"] for r in again["results"]] == [r["seconds"] for r in data["results"]]


def test_eval_rejects_bad_method():
    res = CliRunner().invoke(app, ["eval", "--methods", "int5", "--kc-mode", "static"])
    assert res.exit_code != 0


def _sawkv(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess (stdout a pipe, as in CI logs)."""
    code = "from sawkv.cli import main; main()"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # test runners may set 80
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_known_errors_are_one_line_not_a_traceback():
    for args, expected in [
        (["generate", "--model", "smollm2-13m", "hi"], "unknown model 'smollm2-13m'"),
        (["generate", "--kv-cache-dtype", "int4-bogus", "hi"], "unknown KV cache method"),
        (["serve", "smollm2-135m", "--kv-cache-dtype", "kivi2"], "kivi2"),
    ]:
        out = _sawkv(*args)
        assert out.returncode == 1, out
        assert out.stderr.startswith("sawkv: error: ") and expected in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_help_is_not_cut_and_names_no_missing_file():
    out = _sawkv("serve", "--help")
    assert out.returncode == 0
    for option in ("--max-num-batched-tokens", "--gpu-memory-utilization", "--drain-timeout"):
        assert option in out.stdout
    assert "MODELS.md" not in out.stdout and "…" not in out.stdout


def test_llm_docstring_example_names_a_real_model():
    import re

    import sawkv
    from sawkv.models.hub import KNOWN_MODELS

    names = re.findall(r'LLM\("([^"]+)"', sawkv.LLM.__doc__)
    assert names and all(name in KNOWN_MODELS for name in names)


def test_one_default_kv_method_everywhere():
    import inspect

    from sawkv.defaults import DEFAULT_KV_METHOD
    from sawkv.server.cli import serve_cmd

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    from sawkv.cli import generate_cmd

    assert DEFAULT_KV_METHOD == "saw-int4"
    assert default(generate_cmd, "kv_cache_dtype") == DEFAULT_KV_METHOD
    assert default(serve_cmd, "kv_cache_dtype") == DEFAULT_KV_METHOD
    from sawkv.hf.cache import SawKVCache
    from sawkv.server.api_server import serve

    assert default(serve, "kv_cache_dtype") == DEFAULT_KV_METHOD
    assert default(SawKVCache.__init__, "method") == DEFAULT_KV_METHOD


def test_calibrate_and_eval_reject_bad_input(tmp_path):
    res = CliRunner().invoke(app, ["calibrate", "--model", "smollm2-135m", "--budget", "3"])
    assert res.exit_code != 0 and "budget" in res.output
    res = CliRunner().invoke(app, ["calibrate", "--model", "smollm2-135m", "--texts", "pg19"])
    assert res.exit_code != 0 and "pg19" in res.output
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    res = CliRunner().invoke(app, ["eval", "--methods", "auto", "--text", str(latin)])
    assert res.exit_code != 0 and "not UTF-8" in res.output


def test_report_mc_items_overrides_the_size(tmp_path, monkeypatch):
    import sawkv.eval.report as report
    import sawkv.eval.study as study

    seen = {}

    def fake_run(models, methods, tasks, out, size, device="cpu"):
        seen.update(models=models, tasks=tasks, size=size)
        return []

    monkeypatch.setattr(study, "run_study", fake_run)
    monkeypatch.setattr(report, "build_report", lambda *a: tmp_path / "report.md")
    args = ["report", "--models", "m", "--methods", "auto", "--tasks", "hellaswag", "--size",
            "gpu", "--out", str(tmp_path)]  # fmt: skip
    res = CliRunner().invoke(app, [*args, "--mc-items", "400"])
    assert res.exit_code == 0, res.output
    gpu = study.SIZES["gpu"]
    assert seen["size"].mc_items == 400 and gpu.mc_items == 100
    assert seen["size"].ppl_tokens == gpu.ppl_tokens  # everything else as the size says
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and seen["size"] == gpu
    res = CliRunner().invoke(app, [*args, "--mc-items", "0"])
    assert res.exit_code != 0 and "--mc-items must be positive" in res.output
