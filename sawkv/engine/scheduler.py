"""Continuous batching scheduler: token budget, chunked prefill, preemption by recompute, FCFS.

Each step, running sequences (oldest first) get their next tokens: one for decode, a chunk
for an unfinished prefill. When the pool cannot give a sequence its pages, the youngest
running sequence is preempted: its pages are freed and it goes back to the *front* of the
waiting queue, to be prefilled again (prompt + outputs so far); nothing is dropped. Then, if
no one was preempted, waiting sequences are admitted in arrival order while the token budget,
``max_num_seqs`` and the pool allow, taking prefix-cache hits first. A waiting sequence that
does not fit blocks those behind it (FCFS, no overtaking).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sawkv.cache.block_manager import BlockManager
from sawkv.config import SchedulerConfig
from sawkv.engine import request_metrics
from sawkv.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """The step's work: ``num_new_tokens[i]`` tokens of ``seqs[i]`` starting at its
    ``num_computed_tokens``."""

    seqs: list[Sequence]
    num_new_tokens: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # set by the engine: a sequence this long has produced its last token (async
        # scheduling keeps such a sequence running until its last sample is read back)
        self.max_model_len: int | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.config.max_num_batched_tokens
        preempted = self._schedule_running(batch, budget)
        if not preempted:
            self._schedule_waiting(batch, budget - batch.num_tokens)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> bool:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self._at_limit(seq):  # its last token is still on the device: nothing to run
                i += 1
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + n):
                preempted = True
                victim = self.running.pop()  # youngest first
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1
        return preempted

    def _at_limit(self, seq: Sequence) -> bool:
        if seq.num_computed_tokens < seq.num_prompt_tokens:
            return False
        limit = self.max_model_len
        return seq.num_output_tokens >= seq.params.max_tokens or (
            limit is not None and seq.num_tokens >= limit
        )

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hit = bm.match_prefix(seq)
            seq.num_computed_tokens = hit
            n = seq.num_uncomputed_tokens
            if n > budget and not self.config.enable_chunked_prefill and batch.seqs:
                bm.free(seq)
                seq.num_computed_tokens = 0
                break
            n = min(n, budget)
            if not bm.ensure_slots(seq, seq.num_computed_tokens + n):
                bm.free(seq)  # FCFS: the head waits for pages, nobody overtakes it
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if seq.first_scheduled_time is None:  # a preempted request keeps its first
                seq.first_scheduled_time = request_metrics.now()
            bm.num_hit_tokens += hit
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s pages and requeue it at the front for recompute."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.block_manager.free(seq)
                    seq.status = SequenceStatus.FINISHED
                    seq.finish_reason = "abort"
                    return seq
        return None
