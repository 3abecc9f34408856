"""Study + report end to end on a local HF directory (tiny random Llama + the SmolLM2 tokenizer):
every baseline calibrates on calibration windows, results are resumable, the report renders."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sawkv.eval import report, study
from sawkv.models import resolve_model_dir


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
    except (ValueError, OSError) as e:
        pytest.skip(f"SmolLM2 tokenizer not installed: {e}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=1024)  # fmt: skip
    d = tmp_path_factory.mktemp("tinyllama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture()
def cache_root(tmp_path, monkeypatch):
    """Model artifacts (key means, codebooks, ...) go to a temp dir, not the user's cache."""
    import sawkv.models.hub as hub

    def mcd(name):
        p = tmp_path / "artifacts" / str(abs(hash(str(name))))
        p.mkdir(parents=True, exist_ok=True)
        return p

    monkeypatch.setattr(hub, "model_cache_dir", mcd)
    return tmp_path


METHODS = ["auto", "int4", "int4-bdr-kc", "kivi2-g8-r16", "kmeans2-d2", "gptq4-bdr-kc",
           "mixed4.5-s2"]  # fmt: skip


def test_study_resumes_and_reports(local_model, cache_root):
    size = study.SIZES["tiny"]
    out = cache_root / "results"
    try:
        paths = study.run_study([local_model], METHODS, ["ppl-austen"], out, size, strict=True,
                                log=lambda *_: None)  # fmt: skip
    except ValueError as e:
        if "not installed" in str(e):
            pytest.skip(str(e))
        raise
    assert len(paths) == len(METHODS) and all(p.is_file() for p in paths)
    res = {p.name.split("__")[0]: json.loads(p.read_text()) for p in paths}
    assert set(res) == {"auto", "int4", "int4-bdr32-kc", "kivi2-g8-r16", "kmeans2-d2",
                        "gptq4-bdr32-kc", "mixed4.5-bdr32-s2"}  # fmt: skip
    assert res["int4"]["bits_per_element"] == pytest.approx(5.0)  # head_dim 32: 4 + 32/32
    assert res["kmeans2-d2"]["bits_per_element"] == 2.0
    # artifacts were fitted once and cached
    arts = {p.name.split("_")[0] for p in (cache_root / "artifacts").rglob("*.pt")}
    assert {"codebooks", "query", "sensitivity"} <= arts
    # resumable: a second run recomputes nothing (files untouched)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    study.run_study([local_model], METHODS, ["ppl-austen"], out, size, strict=True,
                    log=lambda *_: None)  # fmt: skip
    assert mtimes == [p.stat().st_mtime_ns for p in paths]
    md = report.build_report(out, [local_model], METHODS, ["ppl-austen"]).read_text()
    for name in res:
        assert f"| {name} |" in md
    # capacity column: 2 layers x 2 KV heads x d=32, K and V; int4 at 5 bits is 160 bytes a
    # token, auto (fp32 here) counts as BF16, 512 bytes: 126.9e9 / (16384 x bytes) sequences
    assert "| int4 | 5.00 | 48,408 |" in md
    assert "| auto | 32.00 | 15,127 |" in md
    summary = json.loads((out / "study_summary.json").read_text())
    assert len(summary[local_model]) == len(METHODS)


def _res(primary, vals, **kw):
    r = {"primary": primary, "bits_per_element": 4.5, **kw}
    if primary == "ppl":
        r["window_nll"] = vals
    else:
        r["correct"] = r["correct_norm"] = vals
        r[primary] = sum(vals) / len(vals)
        r[primary + "_se"] = 0.1
    return r


def test_paired_comparisons():
    ref = _res("acc", [1, 0, 1, 1])
    m = _res("acc", [1, 0, 0, 1])
    cmp = report.compare(m, ref, None)
    assert cmp["delta"] == pytest.approx(-0.25)
    assert cmp["delta_se"] == pytest.approx(0.25)  # sd of [0,0,-1,0] / sqrt(4)
    a = _res("ppl", [3.0, 3.2], ppl=20.0, ppl_se=1.0)
    b = _res("ppl", [3.1, 3.3], ppl=22.0, ppl_se=1.0)
    naive = _res("ppl", [4.0, 4.2], ppl=40.0, ppl_se=2.0)
    cmp = report.compare(b, a, naive)
    assert cmp["ppl_ratio"] == pytest.approx(1.1)
    assert cmp["gap_recovered"] == pytest.approx(0.9)
    assert cmp["ppl_ratio_se"] == pytest.approx(0.0, abs=1e-9)  # a constant shift: no noise


def test_results_of_another_size_are_not_compared():
    ref = _res("ppl", [3.0, 3.2], ppl=20.0, ppl_se=1.0, num_tokens=2046)
    small = _res("ppl", [3.1], ppl=22.0, ppl_se=1.0, num_tokens=1023)
    cmp = report.compare(small, ref, None)
    assert cmp == {"other_size": True}
    results = {"auto": {"ppl-austen": ref}, "int4": {"ppl-austen": small}}
    table, _ = report.model_table("m", results, ["auto", "int4"], ["ppl-austen"])
    row = next(line for line in table.splitlines() if line.startswith("| int4"))
    assert "other size: 1023 tok" in row and "%" not in row
    same = _res("ppl", [3.1, 3.3], ppl=22.0, ppl_se=1.0, num_tokens=2046)
    assert "ppl_ratio" in report.compare(same, ref, None)


def test_capacity_needs_the_models_shape():
    assert report.attention_shape_of("no-such-model-anywhere") is None
    assert report.concurrent_seqs(None, 4.25) is None
    # Qwen3-8B's shape (36 layers, 8 KV heads, d=128): 147,456 BF16 bytes a token
    assert report.concurrent_seqs((36, 8, 128), 16.0) == int(126.9e9 // (16384 * 147456))


def test_report_marks_results_from_another_device():
    ref = _res("acc", [1, 0, 1, 1], device="NVIDIA H100 80GB HBM3")
    same = _res("acc", [1, 0, 0, 1], device="NVIDIA H100 80GB HBM3")
    other = _res("acc", [1, 1, 1, 1], device="cpu")
    for r in (ref, same, other):
        r["num_items"] = 4
    results = {"auto": {"mmlu": ref}, "int4": {"mmlu": same}, "int8": {"mmlu": other}}
    table, _ = report.model_table("m", results, ["auto", "int4", "int8"], ["mmlu"])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert rows["int8"].endswith("† |") and not rows["int4"].endswith("† |")
    assert "† scored on another device" in table
