"""What the engine returns per step and per finished request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """One request's progress after an engine step.

    ``new_token_ids`` are the tokens produced by this step (for streaming); ``output_token_ids``
    all tokens generated so far: the sequence's own list, shared rather than copied every step
    (it keeps growing while the request runs; copy it to keep a snapshot). ``finish_reason``
    is "stop" (EOS, stop token or stop string), "length" (max_tokens or max_model_len) or
    "abort", and None while running.
    """

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    text: str = ""  # detokenized output so far (empty when there is no tokenizer)


@dataclass
class CompletionOutput:
    """A finished generation as returned by ``LLM.generate``."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
