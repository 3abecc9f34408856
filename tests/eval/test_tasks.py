"""Tasks: answer extraction, continuation split, batched log-likelihood vs an independent
per-sequence reference, the task data loaders, and the needle prompt."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sawkv.eval import needle, tasks
from sawkv.models import resolve_model_dir


@pytest.fixture(scope="module")
def tokenizer():
    try:
        return AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
    except (ValueError, OSError) as e:
        pytest.skip(f"SmolLM2 not installed: {e}")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=256)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("9 + 9 = 18. So the answer is 18.", "18"),
        ("So the answer is $1,250.", "1250"),
        ("It costs 3.50 then 7.0", "7"),
        ("The answer is -4", "-4"),
        ("no digits here", None),
    ],
)
def test_extract_answer(text, want):
    assert tasks.extract_answer(text) == want


def test_encode_pair_counts_continuation_tokens(tokenizer):
    ids, n = tasks.encode_pair(tokenizer, "Question: Why?\nAnswer:", " because it is")
    cont = tokenizer.decode(ids[-n:])
    assert cont == " because it is"
    assert tokenizer.decode(ids[:-n]) == "Question: Why?\nAnswer:"


def _ref_loglik(model, ids, n):
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(lp[i - 1, ids[i]].item() for i in range(len(ids) - n, len(ids)))


def test_loglik_batch_matches_per_sequence_reference(model):
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(0, 256, (L,), generator=g).tolist(), n)
            for L, n in ((12, 3), (20, 5), (7, 1))]  # fmt: skip
    got = tasks.loglik_batch(model, seqs, "auto")
    for (ids, n), v in zip(seqs, got):
        assert v == pytest.approx(_ref_loglik(model, ids, n), abs=1e-3)
    # padding is invisible to a token-wise quantized cache too: batched == one at a time
    mu = torch.randn(2, 2, 32)
    q = tasks.loglik_batch(model, seqs, "int4-bdr32-kc", mu)
    single = [tasks.loglik_batch(model, [s], "int4-bdr32-kc", mu)[0] for s in seqs]
    assert q == pytest.approx(single, abs=1e-3)


@pytest.mark.parametrize("task", tasks.MC_TASKS)
def test_load_mc(task):
    try:
        items = tasks.load_mc(task, 5)
    except ValueError as e:
        pytest.skip(str(e))
    assert len(items) == 5
    assert items == tasks.load_mc(task, 5)  # seeded: same subset every time
    for it in items:
        assert len(it.pairs) >= 2 and 0 <= it.label < len(it.pairs)
        assert all(c and x.startswith(" ") for c, x in it.pairs)


def test_load_gsm8k_shots():
    try:
        items = tasks.load_gsm8k(2, num_shots=2)
    except ValueError as e:
        pytest.skip(str(e))
    prompt, gold = items[0]
    assert prompt.count("Question:") == 3 and prompt.endswith("Answer:")
    assert gold == "18"


def test_needle_prompt(tokenizer):
    hay = tokenizer("Some words here. " * 600, add_special_tokens=False)["input_ids"]
    for depth in (0.0, 0.5, 1.0):
        ids = needle.build_prompt(tokenizer, hay, 512, depth)
        assert len(ids) == 512
        text = tokenizer.decode(ids)
        assert needle.NEEDLE.strip() in text and text.endswith("San Francisco is")
        pos = text.index("Dolores") / len(text)
        assert abs(pos - depth) < 0.15
    assert needle.needle_score(" eat a sandwich in Dolores Park") == 1.0
    assert needle.needle_score(" go to the beach") == 0.0
    with pytest.raises(ValueError):
        needle.build_prompt(tokenizer, hay, 512, 1.5)


def test_run_mc_checkpoint_resumes_and_matches_a_full_run(model, monkeypatch, tmp_path):
    g = torch.Generator().manual_seed(1)
    words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (6,), generator=g))
             for _ in range(40)]  # fmt: skip
    pool = [tasks.MCItem(pairs=tuple((f"ctx {words[i]}", f" {words[i + k]}") for k in range(1, 4)),
                         label=i % 3) for i in range(12)]  # fmt: skip
    monkeypatch.setattr(tasks, "load_mc", lambda task, n: pool[:n])
    monkeypatch.setattr(
        tasks, "encode_pair", lambda tok, c, x: ([ord(ch) % 256 for ch in c + x], len(x))
    )
    real = tasks.loglik_batch
    calls = {"n": 0, "fail_at": None}

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt  # the run is stopped mid-way
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "loglik_batch", counting)
    full = tasks.run_mc(model, None, "piqa", "int4-bdr32", num_items=12)
    ck = tmp_path / "mc.partial.jsonl"
    calls.update(n=0, fail_at=6)
    with pytest.raises(KeyboardInterrupt):
        tasks.run_mc(
            model, None, "piqa", "int4-bdr32", num_items=12, checkpoint=ck, fingerprint="a"
        )
    assert len(ck.read_text().splitlines()) == 1 + 5  # header + the 5 finished items
    with ck.open("a") as f:
        f.write('{"i": 5, "key": "trunc')  # a line cut short by the kill
    calls.update(n=0, fail_at=None)
    got = tasks.run_mc(
        model, None, "piqa", "int4-bdr32", num_items=12, checkpoint=ck, fingerprint="a"
    )
    assert calls["n"] == 7 and got["resumed_items"] == 5
    assert got["correct"] == full["correct"] and got["correct_norm"] == full["correct_norm"]
    # nested subsets: a smaller finished run is reused by a larger one, by item text
    small = tmp_path / "small.jsonl"
    tasks.run_mc(model, None, "piqa", "int4-bdr32", num_items=4, checkpoint=small, fingerprint="a")
    calls.update(n=0)
    tasks.run_mc(model, None, "piqa", "int4-bdr32", num_items=6, checkpoint=small, fingerprint="a")
    assert calls["n"] == 2
    # another method's (or recipe's) checkpoint is not reused
    calls.update(n=0)
    tasks.run_mc(model, None, "piqa", "int4-bdr32", num_items=6, checkpoint=small, fingerprint="b")
    assert calls["n"] == 6
