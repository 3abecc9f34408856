"""The engine loop: requests in, one scheduled step at a time, :class:`RequestOutput` out."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sawkv.cache.block_manager import BlockManager
from sawkv.cache.kv_cache import KVCacheSpec
from sawkv.config import EngineConfig
from sawkv.engine.detokenizer import IncrementalDetokenizer
from sawkv.engine.kv_method import load_key_means, resolve_kv_method
from sawkv.engine.model_runner import ModelRunner
from sawkv.engine.outputs import RequestOutput
from sawkv.engine.profiler import StepProfiler
from sawkv.engine.request_metrics import RequestMetrics
from sawkv.engine.sampler import Sampler
from sawkv.engine.sampling_params import SamplingParams
from sawkv.engine.scheduler import Scheduler
from sawkv.engine.sequence import Sequence, SequenceStatus
from sawkv.engine.step_inputs import PLACEHOLDER
from sawkv.models.loader import resolve_model

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """A launched step whose samples are still on their way to the host (async scheduling).

    ``seqs[i]`` sampled ``tokens[i]`` (device tensor) into the placeholder at
    ``seqs[i].token_ids[slots[i]]``; ``host`` receives a copy, complete once ``event`` fires."""

    seqs: list[Sequence]
    slots: list[int]
    tokens: torch.Tensor
    host: torch.Tensor
    event: torch.cuda.Event | None
    rows: dict[str, int]


class LLMEngine:
    """Continuous-batching engine over the paged (optionally INT4) KV cache.

    >>> engine = LLMEngine.from_args("qwen3-8b", kv_cache_dtype="int4-bdr128")  # doctest: +SKIP
    >>> engine.add_request("r0", [1, 2, 3], SamplingParams(max_tokens=8))  # doctest: +SKIP
    >>> while engine.has_unfinished_requests(): outs = engine.step()  # doctest: +SKIP
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model_config, model_dir = resolve_model(config.model)
        if model_dir is None and config.load_format != "dummy":
            log.info("%s is a shape preset without weights: using dummy weights", config.model)
        self.model_config = model_config
        self.model_name = config.model
        sc = config.scheduler
        self.max_model_len = sc.max_model_len or model_config.max_position_embeddings
        weights_dir = None if config.load_format == "dummy" else model_dir
        # saw-int4 -> the model's per-layer recipe (each layer its own page format)
        method = resolve_kv_method(
            config.cache.kv_cache_dtype, config.model, model_config, weights_dir
        )
        self.spec = KVCacheSpec(
            method,
            model_config.num_layers,
            model_config.num_kv_heads,
            model_config.head_dim,
            config.cache.block_size,
            config.torch_dtype,
        )
        key_means = load_key_means(config.model, self.spec)
        if config.tensor_parallel_size > 1:
            from sawkv.distributed.launch import start_tensor_parallel

            self.runner = start_tensor_parallel(
                config, model_config, weights_dir, self.spec, self.max_model_len, key_means
            )
            self.spec = self.runner.spec  # pages of rank 0's KV heads: sizes are per GPU
        else:
            self.runner = ModelRunner(
                config, model_config, weights_dir, self.spec, self.max_model_len, key_means
            )
        self._check_pool_fits()
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
            num_first_blocks=self.runner.num_first_blocks,
        )  # fmt: skip
        self.scheduler = Scheduler(sc, self.block_manager)
        self.sampler = Sampler(self.runner.device, config.seed)
        self.tokenizer = _load_tokenizer(model_dir)
        self.eos_token_ids = _eos_ids(model_config, model_dir, self.tokenizer)
        self.seqs: dict[str, Sequence] = {}
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.request_metrics = RequestMetrics()
        self.profiler: StepProfiler | None = None
        self.scheduler.max_model_len = self.max_model_len
        self._pending: _Pending | None = None

    @classmethod
    def from_args(cls, model: str, kv_cache_dtype: str = "auto", **kwargs) -> LLMEngine:
        return cls(EngineConfig.from_args(model, kv_cache_dtype, **kwargs))

    def _check_pool_fits(self) -> None:
        capacity = self.runner.num_blocks * self.config.cache.block_size
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({self.runner.num_blocks} pages), fewer "
                f"than max_model_len={self.max_model_len}: lower max_model_len or give the "
                "cache more memory"
            )

    def shutdown(self) -> None:
        """Abort every request and release the GPU memory (weights, pages, CUDA graphs) and any
        tensor-parallel workers, so a second engine can start in this process. Idempotent."""
        for rid in list(self.seqs):
            self.abort_request(rid)
        self._pending = None
        runner, self.runner = getattr(self, "runner", None), None
        if runner is None:
            return
        if hasattr(runner, "shutdown"):
            runner.shutdown()
        if hasattr(runner, "close"):
            runner.close()

    # ---- requests ---------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Queue a request. Raises ValueError for an empty or over-long prompt, bad token ids or
        a duplicate id."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n > self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, longer than max_model_len={self.max_model_len}"
            )
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, prompt_token_ids, params)
        if params.seed is not None:
            seq.generator = self.sampler.new_generator(params.seed)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Drop a request and free its pages (no-op for unknown or finished ids)."""
        if self.scheduler.abort(request_id) is not None:
            self.seqs.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._pending is not None

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample; return outputs of requests that advanced.

        With ``async_scheduling`` the outputs are those of the previous step: see
        :meth:`_step_async`."""
        if self.config.is_async_scheduling:
            return self._step_async()
        prof = self.profiler
        if prof is not None:
            prof.begin()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        if prof is not None:
            prof.mark("schedule")
        inputs = self.runner.plan(batch)
        if prof is not None:
            prof.mark("plan")
            prof.device_begin()
        logits = self.runner.call("execute", inputs)
        if prof is not None:
            prof.device_end()
            prof.mark("execute")
        self._advance(batch)
        for seq in batch.seqs:
            self.block_manager.register_full_blocks(seq)
        outs = []
        if logits is not None:
            seqs = [batch.seqs[i] for i in inputs.sampled_seqs.tolist()]
            tokens = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs])
            outs = [self._append(seq, tok) for seq, tok in zip(seqs, tokens)]
        if prof is not None:
            prof.mark("post")
            prof.end(inputs.kind, inputs.num_seqs, inputs.num_tokens)
        return outs

    def _step_async(self) -> list[RequestOutput]:
        """Launch step N, then read back step N-1's samples while the device runs step N.

        Step N is planned before N-1's tokens are known: each sampled token stands in its
        sequence as a :data:`PLACEHOLDER` (counts and pages are right; the value is not), and
        the device copies it from N-1's sample tensor into N's inputs. What N-1's tokens decide
        is applied one step late: a sequence that stopped at N-1 (EOS, stop token or string)
        has run once more in step N, whose sample is dropped; prefix-cache pages are registered
        once their tokens are known. Sequences at ``max_tokens`` or ``max_model_len`` are not
        scheduled again, so only stops on a token's value cost a step."""
        prof = self.profiler
        if prof is not None:
            prof.begin()
        batch = self.scheduler.schedule()
        launched = inputs = None
        prev = self._pending
        if prof is not None:
            prof.mark("schedule")
        if batch.seqs:
            inputs = self.runner.plan(batch, prev.rows if prev is not None else None)
            if prof is not None:
                prof.mark("plan")
                prof.device_begin()
            logits = self.runner.execute(inputs, prev.tokens if prev is not None else None)
            if prof is not None:
                prof.device_end(wait=False)
            self._advance(batch)
            if logits is not None:
                seqs = [batch.seqs[i] for i in inputs.sampled_seqs.tolist()]
                tokens = self.sampler.sample(
                    logits, [s.params for s in seqs], [s.generator for s in seqs]
                )
                launched = self._launch_readback(seqs, tokens)
            if prof is not None:
                prof.mark("execute")
        self._pending = None
        outs = self._read_back(prev) if prev is not None else []
        for seq in batch.seqs:  # their computed tokens are all known now
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.register_full_blocks(seq)
        self._pending = launched
        if prof is not None and inputs is not None:
            prof.mark("post")
            prof.end(inputs.kind, inputs.num_seqs, inputs.num_tokens)
        return outs

    def _advance(self, batch) -> None:
        """The batch's tokens are in the pages now: move each sequence's computed count."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens < seq.num_prompt_tokens:  # prefill (or recompute)
                self.num_prompt_tokens_total += min(
                    seq.num_prompt_tokens - seq.num_computed_tokens, n
                )
            seq.num_computed_tokens += n

    def _launch_readback(self, seqs: list[Sequence], tokens: torch.Tensor) -> _Pending:
        """Append a placeholder per sampled sequence and start copying ``tokens`` to the host
        (pinned memory, non-blocking: the copy is queued before the next step's forward)."""
        slots = []
        for seq in seqs:
            slots.append(len(seq.token_ids))
            seq.token_ids.append(PLACEHOLDER)
        event = None
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = tokens
        rows = {seq.request_id: i for i, seq in enumerate(seqs)}
        return _Pending(seqs, slots, tokens, host, event, rows)

    def _read_back(self, p: _Pending) -> list[RequestOutput]:
        """Put step N-1's samples in place of their placeholders and apply stops."""
        if p.event is not None:
            p.event.synchronize()
        outs = []
        for seq, slot, token in zip(p.seqs, p.slots, p.host.tolist()):
            if not seq.is_finished:  # else aborted, or stopped one step earlier
                outs.append(self._append(seq, token, slot))
        return outs

    # ---- profiling --------------------------------------------------------------------------
    def start_profile(self) -> None:
        """Record a host / device time breakdown of every following step (see
        :mod:`sawkv.engine.profiler`; each step then synchronizes once more)."""
        self.profiler = StepProfiler(self.runner.device)

    def stop_profile(self) -> dict[str, dict]:
        """Stop recording; the breakdown per step kind (prefill / decode / mixed)."""
        if self.profiler is None:
            raise RuntimeError("start_profile() was not called")
        summary, self.profiler = self.profiler.summary(), None
        return summary

    def _append(self, seq: Sequence, token: int, slot: int | None = None) -> RequestOutput:
        """Record ``seq``'s new token (appended, or put in its placeholder at ``slot`` under
        async scheduling), apply stops, and describe the step's progress."""
        if slot is None:
            slot = len(seq.token_ids)
            seq.token_ids.append(token)
        else:
            seq.token_ids[slot] = token
        seq.output_ids.append(token)
        self.num_generation_tokens_total += 1
        if len(seq.output_ids) == 1:
            self.request_metrics.first_token(seq)
        reason = self._check_stop(seq, token, num_tokens=slot + 1)
        if reason is not None:
            self.request_metrics.finished(seq)
            del seq.token_ids[slot + 1 :]  # async: the placeholder of a step whose sample drops
            if seq in self.scheduler.waiting:  # async: preempted while its token was pending
                self.scheduler.waiting.remove(seq)
            self.scheduler.finish(seq, reason)
            self.seqs.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            new_token_ids=[token],
            output_token_ids=seq.output_ids,
            finished=reason is not None,
            finish_reason=reason,
            text=seq.text,
        )

    def _check_stop(self, seq: Sequence, token: int, num_tokens: int | None = None) -> str | None:
        """Why ``seq`` stops after ``token`` (None: it goes on). ``num_tokens``: its length
        with that token (default: all of ``token_ids``; async scheduling may have appended
        placeholders after it)."""
        p = seq.params
        num_tokens = seq.num_tokens if num_tokens is None else num_tokens
        num_output = num_tokens - seq.num_prompt_tokens
        # Text costs a tokenizer call per token: only for callers who read it or stop strings
        if self.tokenizer is not None and (p.detokenize or p.stop):
            # incremental: O(window) per token instead of re-decoding the whole output each step
            if seq.detokenizer is None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids)
            prev_len = len(seq.text)
            seq.detokenizer.add([token])
            seq.text = seq.detokenizer.text
            if p.stop and _truncate_at_stop(seq, prev_len):
                return "stop"
        reason = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        elif num_output >= p.max_tokens or num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None and seq.detokenizer is not None:
            seq.detokenizer.flush()  # an incomplete trailing character, as a full decode gives it
            seq.text = seq.detokenizer.text
            if p.stop:
                _truncate_at_stop(seq, prev_len)
        return reason

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "model": self.model_name,
            "kv_cache_dtype": self.spec.method.name,
            "block_size": self.spec.block_size,
            "num_blocks_total": bm.num_blocks,
            "num_blocks_used": bm.num_used_blocks,
            "num_blocks_free": bm.num_free_blocks,
            "kv_cache_bytes": bm.num_blocks * self.spec.bytes_per_block,
            "kv_bytes_per_token": self.spec.bytes_per_token,
            "max_model_len": self.max_model_len,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_prompt_tokens_total": self.num_prompt_tokens_total,
            "num_generation_tokens_total": self.num_generation_tokens_total,
            "prefix_cache_hit_tokens": bm.num_hit_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "histograms": self.request_metrics.snapshot(),
        }


def _truncate_at_stop(seq: Sequence, prev_len: int) -> bool:
    """Cut ``seq.text`` before the first stop string that appears in the newly decoded part."""
    longest = max(len(s) for s in seq.params.stop)
    start = max(0, prev_len - longest + 1)
    hits = [i for i in (seq.text.find(s, start) for s in seq.params.stop) if i >= 0]
    if not hits:
        return False
    seq.text = seq.text[: min(hits)]
    return True


def _load_tokenizer(model_dir: Path | None):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if model_dir is None or not any((model_dir / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        log.warning("no tokenizer in %s (%s): token ids only", model_dir, e)
        return None


def _eos_ids(model_config, model_dir: Path | None, tokenizer) -> set[int]:
    ids = set(model_config.eos_token_ids)
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        eos = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
