"""Prometheus text exposition (format 0.0.4) of the engine's stats snapshot.

No prometheus_client dependency: the set of series is small and fixed. Every series carries a
``model_name`` label. Numeric engine stats without a dedicated series are exported as
``sawkv_engine_<key>`` gauges (``sawkv_engine_<key>_total`` counters for the monotonic ones:
preemptions, prefix-cache hit tokens) so new engine stats show up without touching this file.
"""

from __future__ import annotations

from typing import Any

from sawkv.engine.request_metrics import HISTOGRAM_HELP

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (series name, type, help, function of the stats snapshot)
# fmt: off
_SERIES: list[tuple[str, str, str, Any]] = [
    ("sawkv_kv_blocks_total", "gauge", "KV cache blocks (pages) in the pool.",
     lambda s: s.get("num_blocks_total")),
    ("sawkv_kv_blocks_used", "gauge", "KV cache blocks held by requests.",
     lambda s: s.get("num_blocks_used")),
    ("sawkv_kv_blocks_free", "gauge", "KV cache blocks free for new tokens.",
     lambda s: s.get("num_blocks_free", _sub(s.get("num_blocks_total"), s.get("num_blocks_used")))),
    ("sawkv_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks in use.",
     lambda s: _ratio(s.get("num_blocks_used"), s.get("num_blocks_total"))),
    ("sawkv_num_requests_running", "gauge", "Requests being scheduled (prefill or decode).",
     lambda s: s.get("num_running")),
    ("sawkv_num_requests_waiting", "gauge", "Requests queued for admission.",
     lambda s: s.get("num_waiting")),
    ("sawkv_num_requests_in_flight", "gauge", "HTTP requests admitted and not finished.",
     lambda s: s.get("num_in_flight")),
    ("sawkv_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
     lambda s: s.get("num_prompt_tokens_total")),
    ("sawkv_generation_tokens_total", "counter", "Output tokens generated.",
     lambda s: s.get("num_generation_tokens_total")),
    ("sawkv_prompt_tokens_per_second", "gauge", "Prompt tokens/s over the last 10 s.",
     lambda s: s.get("prompt_tokens_per_s")),
    ("sawkv_generation_tokens_per_second", "gauge", "Output tokens/s over the last 10 s.",
     lambda s: s.get("generation_tokens_per_s")),
]
# fmt: on
_COVERED_KEYS = {
    "num_blocks_total",
    "num_blocks_used",
    "num_blocks_free",
    "num_running",
    "num_waiting",
    "num_in_flight",
    "num_prompt_tokens_total",
    "num_generation_tokens_total",
    "prompt_tokens_per_s",
    "generation_tokens_per_s",
}  # fmt: skip
# Engine stats without a dedicated series that only ever grow: exported as counters.
_COUNTER_KEYS = {"num_preemptions", "prefix_cache_hit_tokens"}


def _sub(a: Any, b: Any) -> Any:
    return None if a is None or b is None else a - b


def _ratio(a: Any, b: Any) -> Any:
    return None if a is None or not b else a / b


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def render_metrics(stats: dict[str, Any], model_name: str) -> str:
    """Render a stats snapshot as Prometheus text; missing stats are left out, not zeroed."""
    labels = f'{{model_name="{_escape_label(model_name)}"}}'
    lines: list[str] = []
    for name, kind, help_text, get in _SERIES:
        value = get(stats)
        if value is None:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"]
    info = {k: v for k, v in sorted(stats.items()) if isinstance(v, str)}
    if info:  # string stats (model, kv_cache_dtype) as labels of a constant-1 series
        info_labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in info.items())
        lines += ["# TYPE sawkv_engine_info gauge", f"sawkv_engine_info{{{info_labels}}} 1"]
    for key, hist in sorted((stats.get("histograms") or {}).items()):
        name = "sawkv_" + key
        lines += [f"# HELP {name} {HISTOGRAM_HELP.get(key, key)}", f"# TYPE {name} histogram"]
        for le, count in hist["buckets"]:
            bucket_labels = f'{{model_name="{_escape_label(model_name)}",le="{le}"}}'
            lines.append(f"{name}_bucket{bucket_labels} {count}")
        lines += [f"{name}_sum{labels} {hist['sum']}", f"{name}_count{labels} {hist['count']}"]
    for key in sorted(stats):
        value = stats[key]
        if key in _COVERED_KEYS or not _is_number(value):
            continue
        name = "sawkv_engine_" + "".join(c if c.isalnum() else "_" for c in key)
        kind = "gauge"
        if key in _COUNTER_KEYS:  # Prometheus counters end in _total
            kind, name = "counter", name + "_total"
        lines += [f"# TYPE {name} {kind}", f"{name}{labels} {value}"]
    return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Inverse for tests and scripts: ``{series name: value}`` (labels dropped: of a
    histogram's ``_bucket`` samples the last, ``le="+Inf"``, is kept)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_and_labels, value = line.rsplit(" ", 1)
        values[name_and_labels.split("{", 1)[0]] = float(value)
    return values
