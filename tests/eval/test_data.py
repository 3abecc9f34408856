"""sawkv.eval.data: the texts are real, windows are deterministic and the splits disjoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from sawkv.eval.data import (
    DataNotInstalledError,
    load_text,
    token_windows,
    window_ranges,
)
from sawkv.models import resolve_model_dir


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))


@pytest.mark.parametrize(
    ("name", "min_chars", "phrases"),
    [
        ("austen", 600_000, ["PRIDE AND PREJUDICE", "Elizabeth", "Mr. Darcy"]),
        ("austen-all", 3_900_000, ["SENSE AND SENSIBILITY", "Emma Woodhouse", "Anne Elliot"]),
        ("paulgraham", 600_000, ["startup", "Lisp"]),
        ("wikipedia", 500_000, ["Aubrey Leon Haines was born"]),
        ("owt", 500_000, ["Economic Policy Institute"]),
    ],
)
def test_texts_are_real(name, min_chars, phrases):
    text = load_text(name)
    assert len(text) > min_chars
    for phrase in phrases:
        assert phrase in text


def test_jsonl_keeps_only_original_passages():
    # Rows also hold 10 sentence-shuffled copies of each passage; they must not leak in.
    text = load_text("wikipedia")
    assert text.count("Aubrey Leon Haines was born") == 1
    assert "and Albert S. He graduated from high school" not in text


def test_austen_all_holds_the_six_books_in_order():
    text = load_text("austen-all")
    titles = [
        "SENSE AND SENSIBILITY",
        "PRIDE AND PREJUDICE",
        "MANSFIELD PARK",
        "EMMA",
        "NORTHANGER ABBEY",
        "Persuasion",
    ]
    positions = [text.find(t) for t in titles]
    assert positions == sorted(positions) and positions[0] == 0 and min(positions) >= 0
    assert load_text("austen") in text


def test_unknown_and_missing_texts(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown text 'pg19'"):
        load_text("pg19")
    monkeypatch.setenv("SAWKV_CACHE", str(tmp_path))
    for name in ("austen", "wikipedia", "owt"):
        with pytest.raises(DataNotInstalledError, match="bash scripts/setup_data.sh"):
            load_text(name)


@pytest.mark.parametrize("n", [40_000, 123_457, 160_000])
@pytest.mark.parametrize("window_len", [128, 1000])
def test_window_ranges_layout(n, window_len):
    num = window_len * 4
    ev = window_ranges(n, num, window_len, "eval")
    ca = window_ranges(n, num + window_len - 1, window_len, "calib")  # floors to 4 windows
    for ranges in (ev, ca):
        assert len(ranges) == 4 and all(e - s == window_len for s, e in ranges)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous
    assert ev[0][0] == n // 3 and ca[0][0] == n // 10  # away from the opening
    assert ca[-1][1] <= ev[0][0]  # disjoint: calibration ends before evaluation begins
    assert ev[-1][1] <= n


def test_window_ranges_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="calib split"):
        window_ranges(10_000, 4096, 1024, "calib")  # [1000, 3333) holds 2 windows
    with pytest.raises(ValueError, match="eval split"):
        window_ranges(10_000, 8192, 1024, "eval")
    with pytest.raises(ValueError, match="split must be"):
        window_ranges(10_000, 1024, 1024, "train")
    with pytest.raises(ValueError, match="num_tokens >= window_len"):
        window_ranges(10_000, 100, 1024)


def test_token_windows(tokenizer):
    text = load_text("austen")
    ev = token_windows(tokenizer, "austen", 2048, 512)
    ca = token_windows(tokenizer, "austen", 1024, 512, split="calib")
    assert ev.dtype == torch.long and ev.shape == (4, 512) and ca.shape == (2, 512)
    assert torch.equal(ev, token_windows(tokenizer, "austen", 2048, 512))  # deterministic
    special = torch.tensor(tokenizer.all_special_ids)
    assert not torch.isin(ev, special).any() and not torch.isin(ca, special).any()  # no BOS
    # Independent check in character space: each window decodes to a piece of the book, the
    # eval windows start about a third in, and the calibration text lies wholly before them.
    ev_at = [text.find(tokenizer.decode(w)) for w in ev]
    ca_at = [text.find(tokenizer.decode(w)) for w in ca]
    assert min(ev_at + ca_at) > 0 and ev_at == sorted(ev_at) and ca_at == sorted(ca_at)
    assert 0.28 < ev_at[0] / len(text) < 0.39 and 0.07 < ca_at[0] / len(text) < 0.13
    assert ca_at[-1] + len(tokenizer.decode(ca[-1])) <= ev_at[0]


def test_token_windows_add_bos(tokenizer):
    plain = token_windows(tokenizer, "austen", 1024, 512, split="calib")
    with_bos = token_windows(tokenizer, "austen", 1024, 512, split="calib", add_bos=True)
    assert with_bos.shape == (2, 513)
    assert (with_bos[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(with_bos[:, 1:], plain)


def test_user_text_files(tmp_path):
    """``--text PATH``: plain UTF-8 as is; JSONL joins the ``text`` fields; clear errors."""
    plain = tmp_path / "notes.txt"
    plain.write_text("Première ligne.\nSecond line — ünïcode.\n", encoding="utf-8")
    assert load_text(str(plain)) == plain.read_text(encoding="utf-8")
    rows = tmp_path / "docs.jsonl"
    rows.write_text('{"text": " one "}\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert load_text(str(rows)) == "one\n\ntwo"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string"):
        load_text(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not valid JSON"):
        load_text(str(broken))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        load_text(str(latin))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no text"):
        load_text(str(empty))
