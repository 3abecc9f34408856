"""Per-request sampling parameters, validated on construction (bad values raise ValueError)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to sample one request's output.

    temperature 0 means greedy; top_k -1 (or 0) disables top-k; top_p 1.0 disables nucleus
    sampling; ``seed`` makes sampling reproducible per request; generation stops at
    ``max_tokens``, at any of ``stop`` (strings, checked on the detokenized text; the stop string
    is not included in the output), at ``stop_token_ids``, or at EOS unless ``ignore_eos``.
    ``detokenize=False``: the engine leaves ``RequestOutput.text`` empty unless ``stop`` needs
    the text (for callers that detokenize the token ids themselves, such as the server's
    streams: one tokenizer call per token instead of two).
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    detokenize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not (0.0 <= self.temperature < math.inf):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must fit in 64 bits (torch.Generator), got {self.seed}")
        if self.top_k is None or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
