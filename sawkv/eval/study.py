"""The accuracy study: every (model, method, task) scored once, one JSON each, resumable.

``run_study`` walks models x methods x tasks and writes
``<out_dir>/study_<model>/<method>__<task>.json``; an existing file is skipped, so an
interrupted run picks up where it stopped and a finished one is only re-read. Models load, and
methods calibrate (:mod:`sawkv.eval.artifacts`), only when one of their results is missing.

Task names: ``ppl-<text>`` (``ppl-austen``, ``ppl-paulgraham``, ``ppl-wikipedia``), the
multiple-choice tasks of :data:`sawkv.eval.tasks.MC_TASKS`, ``gsm8k``, ``needle``.
Sizes (items, tokens, context lengths) come from a :class:`StudySize`; :data:`SIZES` holds the
presets sized for a 2-core CPU, and the per-model caps of :data:`MODEL_CAPS` keep the slow
Qwen2.5-Coder-1.5B (~23 s per 1024-token forward) within a session.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from sawkv.eval.tasks import MC_TASKS

DEFAULT_TASKS = ("ppl-austen", "ppl-paulgraham", "ppl-wikipedia", *MC_TASKS, "gsm8k", "needle")
DEFAULT_METHODS = ("auto", "int8", "fp8", "int4", "int4-bdr64", "int4-bdr64-kc",
                   "int4-bdr-kv-kc", "int3-bdr-kc", "int2-bdr-kv-kc", "kivi4", "kivi2",
                   "kmeans4-d2", "kmeans4-d2-bdr", "gptq4-bdr-kc", "mixed4.5-s4")  # fmt: skip


@dataclass(frozen=True)
class StudySize:
    """How much of each task to run (the same for every method of a model)."""

    ppl_tokens: int = 2048
    ppl_window: int = 1024
    mc_items: int = 50
    gsm8k_items: int = 10
    gsm8k_shots: int = 4
    needle_lens: tuple[int, ...] = (1024, 2048)
    needle_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    cpu_caps: bool = True  # apply MODEL_CAPS (sized for a 2-core CPU)


SIZES = {
    "cpu": StudySize(ppl_tokens=1024, ppl_window=512, mc_items=20, gsm8k_items=2),
    "tiny": StudySize(ppl_tokens=512, ppl_window=512, mc_items=10, gsm8k_items=2,
                      needle_lens=(512,), needle_depths=(0.5,)),  # fmt: skip
    "small": StudySize(),
    "medium": StudySize(ppl_tokens=8192, mc_items=200, gsm8k_items=50,
                        needle_lens=(1024, 2048, 4096), needle_depths=(0.0, 0.25, 0.5, 0.75, 1.0)),
    # One GPU: every model at full size (no CPU caps); needles up to 8K tokens.
    "gpu": StudySize(ppl_tokens=8192, mc_items=100, gsm8k_items=20, gsm8k_shots=4,
                     needle_lens=(1024, 2048, 4096, 8192),
                     needle_depths=(0.0, 0.25, 0.5, 0.75, 1.0), cpu_caps=False),
}  # fmt: skip
# CPU caps for the slow model: fewer items and shorter needles than the preset asks for.
MODEL_CAPS = {"qwen2.5-coder-1.5b": {"ppl_tokens": 1024, "mc_items": 20, "gsm8k_items": 3,
                                     "needle_lens": (1024,)}}  # fmt: skip


NEEDLE_NEW_TOKENS = 12


def size_for(model_name: str, size: StudySize) -> StudySize:
    """``size`` with the CPU caps of ``model_name`` applied (never larger than asked)."""
    caps = MODEL_CAPS.get(model_name, {}) if size.cpu_caps else {}
    fields = {}
    for k, cap in caps.items():
        cur = getattr(size, k)
        if isinstance(cap, tuple):
            fields[k] = tuple(x for x in cur if x <= max(cap)) or cap
        else:
            fields[k] = min(cur, cap)
    return replace(size, **fields)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def result_path(out_dir: Path, model_name: str, method_name: str, task: str) -> Path:
    """``<out_dir>/study_<model>/<method>__<task>.json`` (a local path uses its basename)."""
    model = Path(model_name).name if "/" in model_name else model_name
    return Path(out_dir) / f"study_{safe_name(model)}" / f"{safe_name(method_name)}__{task}.json"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).parent)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_task(task: str, model, tokenizer, method, k_means, size: StudySize,
             checkpoint: Path | None = None, fingerprint: str = "") -> dict:  # fmt: skip
    """Score one task; returns its result dict (see :mod:`sawkv.eval.tasks`). Multiple-choice
    tasks resume from ``checkpoint`` (see :func:`sawkv.eval.tasks.run_mc`)."""
    from sawkv.eval import needle, tasks

    if task.startswith("ppl-"):
        return tasks.run_perplexity(model, tokenizer, task[4:], method, k_means,
                                    size.ppl_tokens, size.ppl_window)  # fmt: skip
    if task in MC_TASKS:
        return tasks.run_mc(model, tokenizer, task, method, k_means, size.mc_items,
                            checkpoint=checkpoint, fingerprint=fingerprint)  # fmt: skip
    if task == "gsm8k":
        return tasks.run_gsm8k(model, tokenizer, method, k_means, size.gsm8k_items,
                               size.gsm8k_shots)  # fmt: skip
    if task == "needle":
        # A context plus the answer must fit the model's window (SmolLM2: 8192 positions).
        window = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        lens = tuple(n for n in size.needle_lens if n + NEEDLE_NEW_TOKENS <= window)
        if not lens:
            raise ValueError(f"no needle context length in {size.needle_lens} fits the "
                             f"model's window of {window} positions")  # fmt: skip
        return needle.run_needle(model, tokenizer, method, k_means, lens, size.needle_depths,
                                 max_new_tokens=NEEDLE_NEW_TOKENS)  # fmt: skip
    raise ValueError(f"unknown task {task!r}; valid: {', '.join(DEFAULT_TASKS)}")


class _Model:
    """Lazily loaded model, key means and calibrated methods of one model name."""

    def __init__(self, name: str, log, device: str = "cpu"):
        self.name, self.log, self.device = name, log, device
        self.model = self.tokenizer = self.k_means = None
        self.methods: dict[str, object] = {}

    def load(self):
        if self.model is None:
            from sawkv.eval.calibrate import get_key_means
            from sawkv.models.hub import load_hf_model

            t0 = time.perf_counter()
            self.model, self.tokenizer = load_hf_model(self.name, device=self.device)
            k_means = get_key_means(self.model, self.tokenizer, self.name)
            # loaded from disk on the CPU; every cache and method reads it next to K
            self.k_means = None if k_means is None else k_means.to(self.device)
            self.log(f"[study] loaded {self.name} in {time.perf_counter() - t0:.0f} s")
        return self

    def method(self, name: str):
        if name not in self.methods:
            from sawkv.eval.artifacts import prepare_method

            self.load()
            m = resolve_method(name, self.model.config)
            self.methods[name] = prepare_method(m, self.model, self.tokenizer, self.name,
                                                self.k_means, log=self.log)  # fmt: skip
        return self.methods[name]


def model_head_dim(config) -> int:
    from sawkv.hf.cache import attention_shape

    return attention_shape(config)[2]


def resolve_method(name: str, config):
    from sawkv.quant import parse_method

    return parse_method(name, model_head_dim(config))


def canonical_method_name(name: str, model_name: str) -> str:
    """The method's canonical name for this model (bare ``-bdr`` settled by its head_dim)."""
    from transformers import AutoConfig

    from sawkv.models.hub import resolve_model_dir

    cfg = AutoConfig.from_pretrained(resolve_model_dir(model_name))
    return resolve_method(name, cfg).name


def run_study(models, methods, tasks, out_dir="benchmarks/results", size: StudySize | None = None,
              log=print, strict: bool = False, device: str = "cpu") -> list[Path]:  # fmt: skip
    """Run every missing (model, method, task) result; returns the result paths (all of them).

    Args:
        models: model names or local HF model directories.
        methods: method names (``parse_method`` grammar, baselines included).
        tasks: task names (:data:`DEFAULT_TASKS`).
        out_dir: results root (``benchmarks/results``).
        size: a :class:`StudySize` (default ``SIZES["small"]``), capped per model.
        strict: re-raise a failing task (tests) instead of logging it and going on.
        device: torch device for the model (and so for every cache and calibration).
    """
    size = size or SIZES["small"]
    paths = []
    for model_name in models:
        m = _Model(model_name, log, device)
        msize = size_for(model_name, size)
        for method_name in methods:
            try:
                canon = canonical_method_name(method_name, model_name)
            except ValueError as e:  # e.g. -bdr256 on a head_dim-64 model: not applicable
                log(f"[study] skipping {method_name} for {model_name}: {e}")
                if strict:
                    raise
                continue
            for task in tasks:
                path = result_path(Path(out_dir), model_name, canon, task)
                paths.append(path)
                if path.is_file():
                    continue
                t0 = time.perf_counter()
                # a stopped multiple-choice run resumes from here (long ones take hours on CPU)
                partial = path.with_suffix(".partial.jsonl")
                try:  # one failing method/task must not stop a long background study
                    method = m.method(method_name)
                    torch.manual_seed(0)
                    recipe = _recipe_fields(method).get("recipe", "")
                    fingerprint = json.dumps([model_name, canon, str(m.model.dtype), recipe])
                    res = run_task(task, m.model, m.tokenizer, method, m.k_means, msize,
                                   checkpoint=partial, fingerprint=fingerprint)  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    log(f"[study] FAILED {model_name} {canon} {task}: {type(e).__name__}: {e}")
                    if strict:
                        raise
                    continue
                finally:  # several studies may share one GPU: give back what this task cached
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                hd = model_head_dim(m.model.config)
                dtype_bits = torch.finfo(m.model.dtype).bits  # what `auto` stores
                date = datetime.now(timezone.utc).isoformat(timespec="seconds")
                res.update(model=model_name, method=canon, task=task, commit=git_commit(),
                           date=date,
                           head_dim=hd, bits_per_element=method.bits_per_element(hd, dtype_bits),
                           **_recipe_fields(method),
                           model_dtype=str(m.model.dtype), size=asdict(msize),
                           device=_device_name(m.model))  # fmt: skip
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(res, indent=1))
                tmp.replace(path)
                partial.unlink(missing_ok=True)
                log(f"[study] {model_name} {canon} {task}: {_fmt(res)} "
                    f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return paths


def _recipe_fields(method) -> dict:
    """A saw-int4 result names the recipe it measured (which layers got what)."""
    if not hasattr(method, "summary"):
        return {}
    return {"recipe": method.summary(), "recipe_layers": [m.name for m in method.layers]}


def _device_name(model) -> str:
    dev = next(model.parameters()).device
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def _fmt(res: dict) -> str:
    key = res["primary"]
    if key == "ppl":
        return f"ppl {res['ppl']:.3f} +- {res['ppl_se']:.3f}"
    return f"{key} {res[key]:.3f} +- {res[key + '_se']:.3f}"
