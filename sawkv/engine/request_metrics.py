"""Per-request latencies the engine observes, as Prometheus-style histograms.

A client's TTFT holds HTTP, tokenization and the engine's queue and prefill; the server-side
split tells them apart (vLLM exports the same series as ``vllm:time_to_first_token_seconds``,
``vllm:request_queue_time_seconds``, ...). Times are ``time.monotonic()`` seconds, taken where
the engine admits a request (arrival), first schedules it (end of queueing), and hands out its
first and last tokens. Under async scheduling a token is handed out one step after it was
sampled, which is when the server can stream it.
"""

from __future__ import annotations

import bisect
import math
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sawkv.engine.sequence import Sequence


def now() -> float:
    """The engine's clock for request timings (one place, so tests can replace it)."""
    return time.monotonic()


# seconds; the upper end covers long prefills queued behind many others
LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip

# series (without the ``sawkv_`` prefix) -> help text; the names are vLLM's
HISTOGRAM_HELP = {
    "time_to_first_token_seconds": "Arrival in the engine to the first output token.",
    "request_queue_time_seconds": "Arrival to the first scheduled step (waiting for admission).",
    "request_prefill_time_seconds": "First scheduled step to the first output token.",
    "time_per_output_token_seconds": "Per request: (last - first token time) / (tokens - 1).",
    "e2e_request_latency_seconds": "Arrival to the last output token of finished requests.",
}


class Histogram:
    """Cumulative-bucket histogram: ``observe(x)``; ``snapshot()`` for exposition."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        """Add one observation; NaN, infinite or negative values (a clock oddity) are dropped
        rather than poisoning the sum."""
        if not math.isfinite(x) or x < 0:
            return
        self.counts[bisect.bisect_left(self.bounds, x)] += 1  # bucket le=b holds x <= b
        self.sum += x
        self.count += 1

    def snapshot(self) -> dict:
        """``{"buckets": [[le, cumulative count], ..., ["+Inf", count]], "sum", "count"}``."""
        buckets, total = [], 0
        for le, c in zip((*self.bounds, "+Inf"), self.counts):
            total += c
            buckets.append([le, total])
        return {"buckets": buckets, "sum": self.sum, "count": self.count}


class RequestMetrics:
    """The engine's request latency histograms (see :data:`HISTOGRAM_HELP`)."""

    def __init__(self) -> None:
        self.hist = {
            name: Histogram(TPOT_BUCKETS if name.startswith("time_per") else LATENCY_BUCKETS)
            for name in HISTOGRAM_HELP
        }
        # the server refreshes stats every step: rebuild the snapshot only after observations
        self._version = 0
        self._snapshot: tuple[int, dict] | None = None

    def first_token(self, seq: Sequence, at: float | None = None) -> None:
        """``seq`` hands out its first output token at ``at`` (default: now)."""
        at = now() if at is None else at
        self._version += 1
        seq.first_token_time = at
        self.hist["time_to_first_token_seconds"].observe(at - seq.arrival_time)
        scheduled = seq.first_scheduled_time
        if scheduled is not None:
            self.hist["request_queue_time_seconds"].observe(scheduled - seq.arrival_time)
            self.hist["request_prefill_time_seconds"].observe(at - scheduled)

    def finished(self, seq: Sequence, at: float | None = None) -> None:
        """``seq`` finished (stop, length or EOS) with its last token handed out at ``at``."""
        at = now() if at is None else at
        self._version += 1
        self.hist["e2e_request_latency_seconds"].observe(at - seq.arrival_time)
        n = len(seq.output_ids)
        if n > 1 and seq.first_token_time is not None:
            self.hist["time_per_output_token_seconds"].observe(
                (at - seq.first_token_time) / (n - 1)
            )

    def snapshot(self) -> dict[str, dict]:
        """``{series name: Histogram.snapshot()}`` (shared until the next observation: do not
        modify it)."""
        if self._snapshot is None or self._snapshot[0] != self._version:
            snap = {name: h.snapshot() for name, h in self.hist.items()}
            self._snapshot = (self._version, snap)
        return self._snapshot[1]
