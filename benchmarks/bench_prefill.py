"""Prefill throughput through the engine: a 16K-token prompt alone and with decodes in the batch.

Dummy Qwen3-8B weights on one GPU, the engine's default chunk budget, public engine API only
(``add_request`` / ``step``). For each KV method:

* alone: one ``--prompt-len`` prompt with ``max_tokens=1``; prefill tok/s = prompt_len / time
  from submission to its first (only) token;
* under load: ``--num-decodes`` requests with short prompts decode continuously; once all of
  them have produced a token, the long prompt is submitted, and its prefill tok/s is measured the
  same way while the decodes share every step with it.

Ratios are against ``bf16`` in the same run. Writes ``prefill_<gpu>.json`` rows
``{"method", "prompt_len", "tok_s", "ratio_vs_bf16", "load"}`` under ``--out``::

    PYTHONPATH=. python benchmarks/bench_prefill.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from sawkv import SamplingParams
from sawkv.engine.llm_engine import LLMEngine


def _prompt(engine: LLMEngine, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, engine.model_config.vocab_size, (n,), generator=g).tolist()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_prefill(engine: LLMEngine, prompt_len: int, rid: str, seed: int) -> float:
    """Seconds from submitting a prompt until its first token (other requests keep running)."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    _sync()
    t0 = time.perf_counter()
    engine.add_request(rid, _prompt(engine, prompt_len, seed), params)
    while True:
        outs = engine.step()
        if any(o.request_id == rid for o in outs):
            _sync()
            return time.perf_counter() - t0


def run_method(args, method: str) -> list[dict]:
    engine = LLMEngine.from_args(
        args.model, kv_cache_dtype=method, load_format=args.load_format,
        max_model_len=args.prompt_len + 512, gpu_memory_utilization=args.gpu_util,
        enable_prefix_caching=False,
        async_scheduling=False,  # a first token is then read back in the step that samples it
    )  # fmt: skip
    _time_prefill(
        engine, min(2048, args.prompt_len), "warm", seed=0
    )  # compile the extend/write paths
    rows = []
    alone = _time_prefill(engine, args.prompt_len, "alone", seed=1)
    rows.append(dict(method=method, prompt_len=args.prompt_len, load=False,
                     tok_s=args.prompt_len / alone, seconds=alone))  # fmt: skip
    long_decode = SamplingParams(temperature=0, max_tokens=10**5, ignore_eos=True)
    for i in range(args.num_decodes):
        engine.add_request(f"d{i}", _prompt(engine, 256, seed=100 + i), long_decode)
    seen: set[str] = set()
    while len(seen) < args.num_decodes:  # every decode is past its prefill
        seen.update(o.request_id for o in engine.step())
    loaded = _time_prefill(engine, args.prompt_len, "loaded", seed=2)
    rows.append(dict(method=method, prompt_len=args.prompt_len, load=True,
                     num_decodes=args.num_decodes, tok_s=args.prompt_len / loaded,
                     seconds=loaded))  # fmt: skip
    for i in range(args.num_decodes):
        engine.abort_request(f"d{i}")
    for r in rows:
        print(f"prefill {method} load={r['load']}: {r['tok_s']:.0f} tok/s", flush=True)
    engine.shutdown()  # frees its pages and graphs before the next method sizes its cache
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--model", default="qwen3-8b")
    ap.add_argument("--methods", default="bf16,int4-bdr128,int4-bdr128-kv-kc")
    ap.add_argument("--prompt-len", type=int, default=16384)
    ap.add_argument("--num-decodes", type=int, default=32)
    ap.add_argument("--gpu-util", type=float, default=0.85)
    ap.add_argument("--load-format", default="dummy")
    args = ap.parse_args()
    rows = []
    for method in args.methods.split(","):
        rows += run_method(args, method)
    base = {r["load"]: r["tok_s"] for r in rows if r["method"] == "bf16"}
    for r in rows:
        if r["load"] in base:
            r["ratio_vs_bf16"] = r["tok_s"] / base[r["load"]]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    gpu = "h200" if "H200" in device else "gpu" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"prefill_{gpu}.json"), "w") as f:
        json.dump({"device": device, "rows": rows}, f, indent=1)
    for r in rows:
        print(f"{r['method']:>20} load={r['load']!s:5} {r['tok_s']:>8.0f} tok/s "
              f"{r.get('ratio_vs_bf16', float('nan')):.2f}x bf16")  # fmt: skip


if __name__ == "__main__":
    main()
