"""A model-free stand-in for ``LLMEngine`` with the same surface, for fast server tests.

Each running request emits one token per step: ``(last token + 1) % vocab_size``; it holds
``ceil(num_tokens / block_size)`` blocks, so page accounting (and leaks) can be checked.
"""

from __future__ import annotations

import math
import time

from sawkv.engine.outputs import RequestOutput
from sawkv.engine.sampling_params import SamplingParams


class FakeEngine:
    def __init__(
        self,
        *,
        max_model_len=64,
        vocab_size=1000,
        block_size=4,
        num_blocks=4096,
        step_s=0.002,
        tokenizer=None,
        max_num_seqs=256,
    ):
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.step_s = step_s
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.requests: dict[str, tuple[list[int], list[int], SamplingParams]] = {}
        self.waiting: list[str] = []
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.aborted: list[str] = []
        self.fail_next_step = False

    def add_request(self, request_id, prompt_token_ids, params):
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError("prompt too long")
        self.requests[request_id] = (list(prompt_token_ids), [], params)
        self.waiting.append(request_id)

    def abort_request(self, request_id):
        self.requests.pop(request_id, None)
        if request_id in self.waiting:
            self.waiting.remove(request_id)
        self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def _running(self):
        return [r for r in self.requests if r not in self.waiting]

    def step(self):
        time.sleep(self.step_s)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected step failure")
        while self.waiting and len(self._running()) < self.max_num_seqs:
            rid = self.waiting.pop(0)
            self.num_prompt_tokens_total += len(self.requests[rid][0])
        outputs = []
        for rid in self._running():
            prompt, out, params = self.requests[rid]
            token = ((out or prompt)[-1] + 1) % self.vocab_size
            out.append(token)
            self.num_generation_tokens_total += 1
            finished = len(out) >= params.max_tokens or len(prompt) + len(out) >= self.max_model_len
            reason = "length" if finished else None
            if token in params.stop_token_ids:
                finished, reason = True, "stop"
            if finished:
                del self.requests[rid]
            outputs.append(RequestOutput(rid, prompt, [token], list(out), finished, reason))
        return outputs

    def stats(self):
        used = sum(
            math.ceil((len(p) + len(o)) / self.block_size)
            for rid, (p, o, _) in self.requests.items()
            if rid not in self.waiting
        )
        return {
            "num_blocks_total": self.num_blocks,
            "num_blocks_used": used,
            "num_running": len(self._running()),
            "num_waiting": len(self.waiting),
            "num_prompt_tokens_total": self.num_prompt_tokens_total,
            "num_generation_tokens_total": self.num_generation_tokens_total,
        }
