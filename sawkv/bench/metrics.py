"""Per-request timings and the summary row every benchmark run writes.

One request's timeline, as the client sees it::

    sent            first token          token 2 ...        last token
     |---- ttft ------|---- itl[0] ----|---- itl[1] ---| ... |
     |<------------------------- latency ------------------->|
    tpot = (latency - ttft) / (num_output_tokens - 1)

A row (``summarize``) holds throughput over the run's wall time and p50/p90/p99 (plus mean) of
TTFT in seconds and TPOT / ITL / E2E latency in milliseconds; failed requests count in
``errors`` and in nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """What one request did. ``itl_s`` are the gaps between consecutive token arrivals (a chunk
    carrying k tokens adds one gap); ``error`` is None on success."""

    num_input_tokens: int
    num_output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if self.num_output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.num_output_tokens - 1)


def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    """``{"mean", "p50", "p90", "p99"}`` of ``values`` times ``scale`` (None when empty)."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    a = np.asarray(values, dtype=np.float64) * scale
    out = {"mean": float(a.mean())}
    out.update({f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES})
    return out


def summarize(results: list[RequestResult], duration_s: float, **labels) -> dict:
    """One benchmark row: ``labels`` (mode, method, input_len, ...) then the measured fields.

    Throughput counts successful requests only and divides by ``duration_s``, the wall time
    from the first request sent to the last response finished.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    ok = [r for r in results if r.error is None]
    num_out = sum(r.num_output_tokens for r in ok)
    num_in = sum(r.num_input_tokens for r in ok)
    errors = [r.error for r in results if r.error is not None]
    return {
        **labels,
        "num_completed": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "duration_s": duration_s,
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "request_s": len(ok) / duration_s,
        "output_tok_s": num_out / duration_s,
        "total_tok_s": (num_in + num_out) / duration_s,
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "tpot_ms": percentiles([t for r in ok if (t := r.tpot_s) is not None], 1e3),
        "itl_ms": percentiles([g for r in ok for g in r.itl_s], 1e3),
        "e2el_ms": percentiles([r.latency_s for r in ok], 1e3),
    }


# request latency histograms (sawkv_, vllm: and sglang: prefixes in /metrics; the engine's
# own in process) -> short row keys
SERVER_HISTOGRAMS = {
    "time_to_first_token_seconds": "ttft",
    "request_queue_time_seconds": "queue",
    "request_prefill_time_seconds": "prefill",
    "e2e_request_latency_seconds": "e2e",
}


def server_means(before: dict, after: dict) -> dict[str, float]:
    """Mean seconds per request between two reads of ``{short name: (sum, count)}``
    (:func:`sawkv.bench.serve.server_histograms`, :func:`engine_histograms`):
    ``{"server_ttft_mean_s": ..., "server_queue_mean_s": ..., ...}`` for the series present in
    both with new observations."""
    out = {}
    for short, (s1, c1) in after.items():
        s0, c0 = before.get(short, (0.0, 0.0))
        if c1 > c0:
            out[f"server_{short}_mean_s"] = (s1 - s0) / (c1 - c0)
    return out


def engine_histograms(stats: dict) -> dict[str, tuple[float, float]]:
    """``{short name: (sum, count)}`` of an in-process engine's ``stats()["histograms"]``."""
    return {
        SERVER_HISTOGRAMS[name]: (h["sum"], h["count"])
        for name, h in (stats.get("histograms") or {}).items()
        if name in SERVER_HISTOGRAMS
    }
