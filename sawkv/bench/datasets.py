"""Prompts of an exact token length: random token ids, or windows of a real text.

Prompts are token-id lists and go to the server as such (``/v1/completions`` accepts them in
sawkv, vLLM and SGLang), so the server sees exactly ``input_len`` prompt tokens: decoding and
re-encoding text would change the length.
"""

from __future__ import annotations

import random

# Random ids avoid both ends of a vocabulary, where tokenizers keep their special tokens
# (SmolLM2 0-16, Llama-3 128000+, Qwen 151643+); every served vocabulary is larger than 30000.
DEFAULT_TOKEN_RANGE = (1000, 30000)


def random_prompts(
    num_prompts: int,
    input_len: int,
    *,
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
    seed: int = 0,
) -> list[list[int]]:
    """``num_prompts`` lists of ``input_len`` ids drawn uniformly from ``[low, high)``.

    The first ids of every prompt differ, so a prefix cache cannot share pages between them.
    """
    low, high = token_range
    if num_prompts < 1 or input_len < 1:
        raise ValueError(
            f"need num_prompts >= 1 and input_len >= 1, got {num_prompts}, {input_len}"
        )
    if not 0 <= low < high:
        raise ValueError(f"token range must satisfy 0 <= low < high, got [{low}, {high})")
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(input_len)] for _ in range(num_prompts)]


def text_prompts(
    token_ids: list[int], num_prompts: int, input_len: int, *, seed: int = 0
) -> list[list[int]]:
    """``num_prompts`` windows of ``input_len`` consecutive ids of a tokenized text, at random
    offsets (windows may overlap; a text shorter than ``input_len`` is an error)."""
    if num_prompts < 1 or input_len < 1:
        raise ValueError(
            f"need num_prompts >= 1 and input_len >= 1, got {num_prompts}, {input_len}"
        )
    if len(token_ids) < input_len:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than input_len={input_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(len(token_ids) - input_len + 1) for _ in range(num_prompts)]
    return [list(token_ids[s : s + input_len]) for s in starts]


def tokenize_text(tokenizer_name: str, text_name: str) -> list[int]:
    """Token ids of a named sawkv evaluation text (``austen``, ``paulgraham``...) under the
    tokenizer of ``tokenizer_name`` (a sawkv model name or a HF directory)."""
    from transformers import AutoTokenizer

    from sawkv.eval.data import load_text
    from sawkv.models.hub import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(tokenizer_name)))
    return tokenizer(load_text(text_name), add_special_tokens=False)["input_ids"]
