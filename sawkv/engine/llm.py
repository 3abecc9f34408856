"""Offline facade: ``LLM(model, kv_cache_dtype=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools

from sawkv.engine.llm_engine import LLMEngine
from sawkv.engine.outputs import CompletionOutput
from sawkv.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
_counter = itertools.count()


class LLM:
    """Batch generation through the engine.

    ``model``: a preset (``qwen3-8b``... dummy weights), a registry name or a HF directory;
    ``kv_cache_dtype``: ``auto``, ``bf16``, ``fp16``, ``saw-int4`` or
    ``int4|int8[-bdr{b}][-kv][-kc][-kh]``;
    other keyword arguments go to :class:`sawkv.config.EngineConfig` and its sub-configs
    (``max_model_len``, ``num_gpu_blocks``, ``max_num_seqs``, ``load_format``...).

    >>> llm = LLM("smollm2-135m", kv_cache_dtype="int4-bdr64")  # doctest: +SKIP
    >>> params = SamplingParams(temperature=0)
    >>> llm.generate("The capital of France is", params)[0].text  # doctest: +SKIP
    """

    def __init__(self, model: str, kv_cache_dtype: str = "auto", **kwargs) -> None:
        self.engine = LLMEngine.from_args(model, kv_cache_dtype=kv_cache_dtype, **kwargs)
        self.tokenizer = self.engine.tokenizer

    def encode_prompts(self, prompts) -> list[list[int]]:
        """str | list[str] | list[int] | list[list[int]] -> token id lists."""
        if isinstance(prompts, str):
            prompts = [prompts]
        elif prompts and all(isinstance(t, int) for t in prompts):
            prompts = [prompts]
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(
                        f"{self.engine.model_name} has no tokenizer (dummy preset): give prompts "
                        "as lists of token ids"
                    )
                out.append(self.tokenizer.encode(p))
            else:
                out.append([int(t) for t in p])
        return out

    def generate(self, prompts, params: SamplingParams | None = None, use_tqdm: bool = True):
        """Generate for every prompt; returns :class:`CompletionOutput` in prompt order."""
        params = params or SamplingParams()
        token_lists = self.encode_prompts(prompts)
        ids = [f"gen-{next(_counter)}" for _ in token_lists]
        for rid, toks in zip(ids, token_lists):
            self.engine.add_request(rid, toks, params)
        done: dict[str, CompletionOutput] = {}
        bar = _progress(len(ids), use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = CompletionOutput(
                        out.prompt_token_ids, out.output_token_ids, out.text, out.finish_reason
                    )
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [done[r] for r in ids]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="req")
