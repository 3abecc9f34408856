"""One request as the engine tracks it: tokens, progress through the cache, pages, stop state."""

from __future__ import annotations

import enum
import itertools

import torch

from sawkv.engine import request_metrics
from sawkv.engine.sampling_params import SamplingParams

_arrival = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt plus generated tokens.

    ``num_computed_tokens`` tokens have K/V in the pages (prefix hits included); the step
    computes the next ``num_tokens - num_computed_tokens`` (a chunk of them under chunked
    prefill). After preemption by recompute the whole of ``token_ids`` is prefilled again.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        # one shared copy for every RequestOutput (slicing 16K-token prompts each step is slow)
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_ids: list[int] = []  # appended by the engine with token_ids
        self.params = params
        self.arrival = next(_arrival)
        # monotonic seconds: admitted by the engine, first scheduled, first token handed out
        # (request_metrics.py)
        self.arrival_time = request_metrics.now()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading full pages already registered in the prefix cache
        self.finish_reason: str | None = None
        self.text = ""
        self.detokenizer = None  # IncrementalDetokenizer, set by the engine when it has a tokenizer
        self.generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.value})"
        )
