"""Needle in a haystack over the Paul Graham essays, read through a quantized KV cache.

The haystack is the essays' text (``load_text("paulgraham")``) cut to ``context_len`` tokens; the
needle sentence is inserted at a sentence boundary near ``depth`` (0 = start, 1 = end) of it;
the prompt ends with a question and the opening of the answer so that base and small instruct
models complete it without a chat template::

    <haystack with needle> \\n\\n Question: What is the best thing to do in San Francisco?
    Answer: The best thing to do in San Francisco is

The model decodes ``max_new_tokens`` greedily (each step reads the quantized cache) and the
score is the share of the needle's key words (``sandwich``, ``dolores``, ``park``) in the
answer; an item counts as retrieved when the score is at least 2/3.
"""

from __future__ import annotations

import math
import time

import torch

from sawkv.eval.sim_cache import build_cache
from sawkv.eval.tasks import binomial_se, prefix_ids
from sawkv.hf.cache import cache_kwargs

NEEDLE = (" The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on"
          " a sunny day.")  # fmt: skip
QUESTION = ("\n\nQuestion: What is the best thing to do in San Francisco?\n"
            "Answer: The best thing to do in San Francisco is")  # fmt: skip
KEYWORDS = ("sandwich", "dolores", "park")
_HAYSTACK: dict[int, list[int]] = {}


def needle_score(answer: str) -> float:
    """Share of the needle's key words in ``answer`` (case-insensitive)."""
    a = answer.lower()
    return sum(k in a for k in KEYWORDS) / len(KEYWORDS)


def build_prompt(tokenizer, haystack_ids: list[int], context_len: int, depth: float) -> list[int]:
    """Token ids of haystack (``context_len`` tokens in all, question included) with the needle
    at ``depth``, snapped back to the nearest preceding sentence end ('.')."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must be in [0, 1], got {depth}")
    pre = prefix_ids(tokenizer)
    needle = tokenizer(NEEDLE, add_special_tokens=False)["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    room = context_len - len(pre) - len(needle) - len(question)
    if room <= 0 or room > len(haystack_ids):
        raise ValueError(f"context_len {context_len} does not fit needle, question and haystack")
    hay = haystack_ids[:room]
    cut = int(round(depth * room))
    period = {i for i, t in enumerate(hay) if tokenizer.decode([t]).rstrip().endswith(".")}
    while cut > 0 and (cut - 1) not in period:
        cut -= 1
    return pre + hay[:cut] + needle + hay[cut:] + question


@torch.no_grad()
def run_needle(
    model, tokenizer, method, k_means=None, context_lens=(1024, 2048), depths=(0.1, 0.5, 0.9),
    max_new_tokens: int = 12,
) -> dict:  # fmt: skip
    """Retrieval score per (context length, depth) with K/V read through ``method``'s cache.

    Returns:
        dict: ``score`` (mean key-word share), ``acc`` (share retrieved) with ``acc_se``,
        ``grid`` (list of {context_len, depth, score, answer}), ``seconds``.
    """
    from sawkv.eval.data import load_text

    t0 = time.perf_counter()
    device = next(model.parameters()).device
    key = id(tokenizer)
    if key not in _HAYSTACK:  # tokenizing the essays takes seconds: once per tokenizer
        _HAYSTACK[key] = tokenizer(load_text("paulgraham"), add_special_tokens=False)["input_ids"]
    hay = _HAYSTACK[key]
    grid = []
    for n in context_lens:
        for d in depths:
            ids = torch.tensor([build_prompt(tokenizer, hay, n, d)], device=device)
            gen = model.generate(
                ids,
                **cache_kwargs(model, build_cache(model, method, k_means)),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            answer = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
            grid.append({"context_len": n, "depth": d, "score": needle_score(answer),
                         "answer": answer})  # fmt: skip
    hits = [int(g["score"] >= 2 / 3) for g in grid]
    acc = sum(hits) / len(hits)
    scores = [g["score"] for g in grid]
    mean = sum(scores) / len(scores)
    var = sum((s - mean) ** 2 for s in scores) / max(len(scores) - 1, 1)
    return {"task": "needle", "primary": "acc", "acc": acc, "acc_se": binomial_se(acc, len(hits)),
            "score": mean, "score_se": math.sqrt(var / len(scores)), "correct": hits,
            "num_items": len(hits), "grid": grid, "context_lens": list(context_lens),
            "seconds": time.perf_counter() - t0}  # fmt: skip
