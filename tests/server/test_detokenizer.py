"""Incremental detokenization against a full decode, with the real SmolLM2 (byte-level BPE)."""

from __future__ import annotations

import random

import pytest

from sawkv.engine.detokenizer import IncrementalDetokenizer, OutputTextStream

# Multi-byte characters that byte-level BPE splits over several tokens (é, CJK, emoji, ZWJ).
TEXTS = [
    "héllo wörld, naïve café",
    "你好，世界！ 日本語のテキスト",
    "emoji 🙂🚀 family 👨‍👩‍👧 flags 🇫🇷 done",
    "plain ascii text with  double  spaces\nand newlines\n\n",
    "mixé 你 🙂 end",
]


def _chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3])
        out.append(ids[i : i + n])
        i += n
    return out


def test_texts_split_characters_over_tokens(smollm2_tokenizer):
    """The cases below are only meaningful if some characters span several tokens."""
    tok = smollm2_tokenizer
    for text in TEXTS[1:3]:
        assert any("\ufffd" in tok.decode([i]) for i in tok(text).input_ids)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(smollm2_tokenizer, text):
    tok = smollm2_tokenizer
    prompt = tok("Say:").input_ids
    ids = tok(text).input_ids
    rng = random.Random(0)
    for _ in range(3):
        detok = IncrementalDetokenizer(tok, prompt)
        deltas = [detok.add(chunk) for chunk in _chunks(ids, rng)] + [detok.flush()]
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
        assert all("\ufffd" not in d for d in deltas)  # never emit half a character


def test_incomplete_character_at_end_is_flushed(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok("ok 你好").input_ids[:-1]  # cut inside the last character's bytes
    detok = IncrementalDetokenizer(tok, [])
    text = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids)
    assert text.endswith("\ufffd")


def test_special_tokens_are_skipped(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok("hi").input_ids + [tok.eos_token_id]
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(detok.add([i]) for i in ids) + detok.flush() == "hi"


def test_stop_string_is_held_back_and_cut(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok("one two STOP three").input_ids
    stream = OutputTextStream(tok, [], stop=["STOP"])
    sent = [stream.update([i], finished=False) for i in ids[:-1]]
    sent.append(stream.update(ids[-1:], finished=True))
    assert "".join(sent) == "one two "
    assert all("S" not in s for s in sent)  # no prefix of the stop string ever went out


def test_no_tokenizer_gives_empty_text():
    stream = OutputTextStream(None, [1, 2], stop=[])
    assert stream.update([3, 4], finished=True) == ""


def test_server_requests_leave_text_to_the_response_stream():
    """The engine thread must not decode every token a second time for the server: requests
    built from the API ask for token ids only; stop strings still reach the engine."""
    from sawkv.server.protocol import ChatCompletionRequest, CompletionRequest

    plain = CompletionRequest(model="m", prompt="hi", max_tokens=4).to_sampling_params(4)
    assert plain.detokenize is False
    stopped = CompletionRequest(model="m", prompt="hi", stop=["x"]).to_sampling_params(4)
    assert stopped.detokenize is False and stopped.stop == ["x"]
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert chat.to_sampling_params(4).detokenize is False
