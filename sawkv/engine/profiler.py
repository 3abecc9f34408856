"""Step-time breakdown of the engine: where a step's wall time goes, host vs device.

One step, as :meth:`sawkv.engine.llm_engine.LLMEngine.step` runs it::

    |schedule|plan|-- execute: launch, then wait --|-- post: sample + outputs --|
                  ^ device start (CUDA event)     ^ device end (event after the logits)
    wall   = end - start of the step (host clock)
    device = time between the two CUDA events (CPU: the execute call itself)
    host   = wall - device: time the device waits for the host (scheduling, planning, launch
             gaps the forward does not hide, sampling, detokenization)

Phases are host wall-clock. Recording waits for the end event before sampling (sampling would
wait for the logits anyway; it adds one kernel launch of latency per step). Under async
scheduling nothing waits: ``execute`` is the launch, ``post`` the read-back of the previous
step (mostly waiting for the device), and device times are read from the events at
:meth:`StepProfiler.summary`. Steps are grouped
by kind: ``prefill`` (no sequence decoding), ``decode`` (one token each) and ``mixed``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

PHASES = ("schedule", "plan", "execute", "post")


@dataclass
class StepRecord:
    """Seconds spent in one step by phase, and the device time of its forward."""

    kind: str
    num_seqs: int
    num_tokens: int
    wall_s: float
    device_s: float
    phase_s: dict[str, float]
    events: tuple | None = None  # (start, end) CUDA events not yet read (async scheduling)


class StepProfiler:
    """Collects a :class:`StepRecord` per engine step; :meth:`summary` aggregates by kind."""

    def __init__(self, device: torch.device) -> None:
        self.is_cuda = device.type == "cuda"
        self.records: list[StepRecord] = []
        self._marks: list[tuple[str, float]] = []
        self._events: tuple | None = None

    def begin(self) -> None:
        self._marks = [("start", time.perf_counter())]

    def mark(self, phase: str) -> None:
        """End of ``phase`` (one of :data:`PHASES`), now."""
        self._marks.append((phase, time.perf_counter()))

    def device_begin(self) -> None:
        if self.is_cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events = (start, torch.cuda.Event(enable_timing=True))

    def device_end(self, wait: bool = True) -> None:
        """After the forward's launch: wait for it (``wait``), so the ``execute`` phase holds
        the device work and ``post`` only host work (sampling would wait for it anyway)."""
        if self.is_cuda:
            self._events[1].record()
            if wait:
                self._events[1].synchronize()

    def end(self, kind: str, num_seqs: int, num_tokens: int) -> None:
        """Close the step begun by :meth:`begin` (after its last :meth:`mark`)."""
        phase_s = {p: b - a for (_, a), (p, b) in zip(self._marks, self._marks[1:])}
        wall = self._marks[-1][1] - self._marks[0][1]
        events = None
        if self.is_cuda and self._events[1].query():
            start, stop = self._events
            device = start.elapsed_time(stop) / 1e3
        elif self.is_cuda:
            device, events = 0.0, self._events  # read in summary()
        else:
            device = phase_s.get("execute", 0.0)  # CPU: the forward runs inside the call
        self.records.append(StepRecord(kind, num_seqs, num_tokens, wall, device, phase_s, events))

    def summary(self) -> dict[str, dict]:
        """Per kind: steps, mean sequences / tokens per step, mean wall / device / host ms and
        each phase's mean ms, host share of the wall time, and total seconds."""
        groups: dict[str, list[StepRecord]] = defaultdict(list)
        if any(r.events is not None for r in self.records):
            torch.cuda.synchronize()
        for r in self.records:
            if r.events is not None:
                r.device_s, r.events = r.events[0].elapsed_time(r.events[1]) / 1e3, None
            groups[r.kind].append(r)
        out = {}
        for kind, rs in sorted(groups.items()):
            n = len(rs)
            wall = sum(r.wall_s for r in rs)
            device = sum(r.device_s for r in rs)
            out[kind] = {
                "steps": n,
                "seqs_per_step": sum(r.num_seqs for r in rs) / n,
                "tokens_per_step": sum(r.num_tokens for r in rs) / n,
                "wall_ms": 1e3 * wall / n,
                "device_ms": 1e3 * device / n,
                "host_ms": 1e3 * (wall - device) / n,
                "host_frac": (wall - device) / wall if wall > 0 else 0.0,
                **{f"{p}_ms": 1e3 * sum(r.phase_s.get(p, 0.0) for r in rs) / n for p in PHASES},
                "total_s": wall,
            }
        return out
