"""Perplexity harness: statistics by hand, equality with a plain forward, method comparison."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from sawkv.eval.perplexity import (
    compare_methods,
    parse_label,
    perplexity,
    split_label,
    summarize,
)
from sawkv.eval.table import add_comparisons, build_table, plot_results


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def windows():
    torch.manual_seed(1)
    return torch.randint(0, 128, (3, 48))


def test_summarize_by_hand():
    s = summarize([20.0, 40.0], [10, 10])  # per-window mean NLL 2 and 4
    assert s["nll_per_token"] == 3.0 and s["num_tokens"] == 20
    assert s["ppl"] == pytest.approx(math.exp(3.0))
    # sd of (2, 4) = sqrt(2); se = sqrt(2)/sqrt(2) = 1; se(ppl) = ppl * 1 (delta method)
    assert s["ppl_se"] == pytest.approx(math.exp(3.0))
    assert math.isnan(summarize([5.0], [5])["ppl_se"])


def test_auto_equals_plain_forward(tiny, windows):
    with torch.no_grad():
        logits = tiny(windows, use_cache=False).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, 128), windows[:, 1:].reshape(-1), reduction="sum")
    want = math.exp(nll.item() / windows[:, 1:].numel())
    got = perplexity(tiny, windows, "auto")
    assert got["ppl"] == pytest.approx(want, rel=1e-5)
    assert got["num_tokens"] == 3 * 47 and got["num_windows"] == 3
    assert got["bits_per_element"] == 32.0  # fp32 model, KV kept as is


def test_quantized_ppl_reports_stored_bytes(tiny, windows):
    r = perplexity(tiny, windows, "int4-bdr64")
    assert r["bits_per_element"] == pytest.approx(4.5)  # d=64: 4 bits + 32 bits / 64
    assert r["kv_bytes"] == 2 * 2 * 48 * 2 * (32 + 4)  # layers x K,V x tokens x heads x bytes
    assert r["method"] == "int4-bdr64" and r["kc_mode"] is None
    assert r["ppl"] != perplexity(tiny, windows, "auto")["ppl"]


def test_split_label():
    assert split_label("int4-bdr64-kc@prefill") == ("int4-bdr64-kc", "prefill")
    assert split_label("int4-bdr64-kc", "static") == ("int4-bdr64-kc", "static")
    assert parse_label("int4-bdr64@sink4") == ("int4-bdr64", {"kc_mode": "static", "num_sink": 4})
    with pytest.raises(ValueError, match="unknown option '@sinks'"):
        parse_label("int4@sinks")


def test_sink_option_reaches_the_cache(tiny, windows):
    r = compare_methods(tiny, windows, ["int4-bdr64@sink4"])[0]
    assert r["num_sink"] == 4
    # 4 of 48 tokens per window kept in fp32 (256 B per vector), 44 as INT4 (36 B)
    assert r["kv_bytes"] == 2 * 2 * 2 * (4 * 256 + 44 * 36)


def test_compare_methods_calibrates_lazily_and_resumes(tiny, windows):
    calls = []

    def key_means():
        calls.append(1)
        return torch.zeros(2, 2, 64)

    saved = []
    labels = ["auto", "int4", "int4-bdr64-kc@prefill"]
    res = compare_methods(tiny, windows, labels, key_means, on_result=saved.append)
    assert [r["label"] for r in res] == labels and not calls  # no static -kc: no calibration
    assert res[2]["kc_mode"] == "prefill" and len(saved) == 3
    done = {r["label"]: r for r in res}
    res2 = compare_methods(tiny, windows, labels + ["int4-bdr64-kc"], key_means, done=done)
    assert calls == [1] and res2[0] is done["auto"]
    assert res2[3]["ppl"] == pytest.approx(perplexity(tiny, windows, "int4-bdr64")["ppl"])


def test_compare_methods_rejects_bad_name_before_running(tiny, windows):
    with pytest.raises(ValueError, match="Hadamard block 128"):
        compare_methods(tiny, windows, ["auto", "int4-bdr128"])


def test_table_and_plot(tmp_path):
    rows = [
        {
            "label": "auto",
            "ppl": 10.0,
            "ppl_se": 0.5,
            "window_nll": [2.0, 2.6],
            "kv_bytes": 100,
            "bits_per_element": 32.0,
        },
        {
            "label": "int4",
            "ppl": 20.0,
            "ppl_se": 1.0,
            "window_nll": [2.7, 3.3],
            "kv_bytes": 14,
            "bits_per_element": 4.5,
        },
        {
            "label": "int4-bdr64-kc",
            "ppl": 10.2,
            "ppl_se": 0.5,
            "window_nll": [2.02, 2.62],
            "kv_bytes": 14,
            "bits_per_element": 4.5,
        },
    ]
    add_comparisons(rows)
    assert rows[2]["delta_pct"] == pytest.approx(2.0)
    assert rows[2]["gap_recovered"] == pytest.approx(0.98)
    assert rows[2]["delta_se_pct"] == pytest.approx(0.0, abs=1e-9)  # constant paired shift
    assert build_table(rows).row_count == 3
    plot_results(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
