"""Where a decode step's (or a first token's) device time goes, kernel by kernel, per KV method.

Answers "why is INT4 slower than BF16 at c=1": one engine per method (dummy weights), ``batch``
requests decoding together, ``steps`` decode steps under ``torch.profiler`` (CUDA graphs on, as
served; CUPTI records the kernels a graph replay launches). Prints, per method, the step's wall
time and device time per kernel family (GEMMs, attention decode, cache write, norms, ...) per
step, and writes everything as JSON:

    python benchmarks/profile_step.py --methods bf16,int4-bdr128 --batch 1 --out $OUT
    python benchmarks/profile_step.py ... --trace   # + each method's timeline (trace_*.json.gz)

``--prefill`` times the other end, what TTFT pays: ``batch`` fresh prompts of ``input_len``
tokens submitted together, each asking for one token, run to completion (their prefill
steps; by default one chunk budget fits them all, ``--max-batched`` sets the server's); wall
and device time per burst and the kernels by family (``profile_prefill_b{batch}.json``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch

from sawkv.bench.throughput import build_engine, warm_up
from sawkv.engine.sampling_params import SamplingParams

# kernel name -> family, first match wins (names differ across torch/cuBLAS/Triton versions)
FAMILIES = [
    ("decode_attention", r"paged_decode|decode_kernel|_decode|flash_fwd_splitkv|flash_decod"),
    ("dequant", r"dequant"),
    ("rotate", r"rotate_cast"),  # the SDPA path's query (and rotated-V output) rotation
    ("prefill_attention", r"flash_fwd|fmha|_extend_kernel|attention"),
    ("split_reduce", r"reduce|combine"),
    ("cache_write", r"cache_write|write_kv|index_copy|scatter|reshape_and_cache|_write"),
    ("gemm", r"gemm|gemv|sm90_xmma|cutlass|nvjet|ampere_|sm80_|matmul|splitK"),
    ("norm_rope_act", r"norm|rope|rotary|silu|gelu|act_and_mul|mul_kernel|triton_"),
    ("sampling", r"argmax|topk|sort|softmax|sample|multinomial"),
    ("copy_fill", r"copy|fill|memcpy|memset|cat|elementwise|vectorized|unrolled"),
]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def family(name: str) -> str:
    low = name.lower()
    for fam, pat in FAMILIES:
        if re.search(pat, low):
            return fam
    return "other"


def idle_gaps(spans: list[tuple[float, float, str]], steps: int) -> dict:
    """Where the GPU sits idle between kernels: ``spans`` ``(start_us, end_us, name)`` of
    every kernel of ``steps`` steps -> idle microseconds per step, split into gaps under 20 us
    (inside a step: launch latency between graph nodes) and longer ones (between steps, waiting
    on the host), and the short-gap time per step by the family of the kernel that follows."""
    spans = sorted(spans)
    inner, outer = 0.0, 0.0
    before: dict[str, float] = defaultdict(float)
    last_end = None
    for start, end, name in spans:
        if last_end is not None and start > last_end:
            gap = start - last_end
            if gap < 20.0:
                inner += gap
                before[family(name)] += gap
            else:
                outer += gap
        last_end = end if last_end is None else max(last_end, end)
    return {
        "inside_steps_us_per_step": inner / steps,
        "between_steps_us_per_step": outer / steps,
        "inside_by_next_family_us_per_step": {
            k: v / steps for k, v in sorted(before.items(), key=lambda kv: -kv[1])
        },
    }


def _engine(args, method: str, max_batched: int):
    """(engine with dummy weights, row label) for ``METHOD`` or ``METHOD@triton`` (the CUDA
    decode off); synchronous scheduling, so steps are timed one by one."""
    name, _, impl = method.partition("@")
    if impl not in ("", "triton"):
        raise ValueError(f"unknown decode kernel suffix @{impl} (only @triton)")
    os.environ["SAWKV_CUDA_DECODE"] = "0" if impl == "triton" else "1"
    engine = build_engine(
        args.model, name, load_format="dummy", max_model_len=args.max_model_len,
        max_num_seqs=max(args.batch, 8), max_num_batched_tokens=max_batched,
        async_scheduling=False,
    )  # fmt: skip
    return engine, method


def _close(engine) -> None:
    engine.shutdown()
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile_method(args, method: str) -> dict:
    """One engine's decode steps; ``METHOD@triton`` runs METHOD with the CUDA decode off."""
    engine, label = _engine(args, method, args.max_batched or 4096)
    prompt = [int(x) for x in torch.randint(100, 20000, (args.input_len,))]
    warm_up(engine, prompt[:16])
    params = SamplingParams(temperature=0, max_tokens=args.steps * 3 + 16, ignore_eos=True,
                            detokenize=False)  # fmt: skip
    for i in range(args.batch):
        engine.add_request(f"p{i}", prompt, params)
    # prefill every request and a few decode steps (graphs replay from here on)
    for _ in range(args.batch + 8):
        engine.step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    _sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps

    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            engine.step()
        _sync()
    if args.trace:  # the host and device timeline (chrome://tracing, Perfetto), gzipped
        raw = Path(args.out) / f"trace_b{args.batch}_{label.replace('@', '_')}.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as f_in, gzip.open(f"{raw}.gz", "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
        raw.unlink()
    fams, top_rows, spans = _kernel_table(prof, args.steps)
    gaps = idle_gaps(spans, args.steps)
    _close(engine)
    return {
        "method": label,
        "batch": args.batch,
        "input_len": args.input_len,
        "wall_ms_per_step": wall_ms,
        "device_us_per_step": sum(fams.values()),
        "families_us_per_step": fams,
        "idle_gaps": gaps,
        "top_kernels": top_rows,
    }


def _kernel_table(prof, per: int) -> tuple[dict, list, list]:
    """(families -> us per unit, top kernels, spans) of a profile covering ``per`` units."""
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    spans = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            k = kernels[ev.name]
            k[0] += ev.device_time  # microseconds
            k[1] += 1
            spans.append((ev.time_range.start, ev.time_range.end, ev.name))
    fams: dict[str, float] = defaultdict(float)
    for name, (us, _n) in kernels.items():
        fams[family(name)] += us / per
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    top_rows = [
        {"name": n[:160], "us_per_step": us / per, "calls_per_step": c / per, "family": family(n)}
        for n, (us, c) in top
    ]
    return dict(sorted(fams.items(), key=lambda kv: -kv[1])), top_rows, spans


def profile_prefill(args, method: str) -> dict:
    """``args.batch`` fresh prompts of ``args.input_len`` tokens at once, one output token each,
    run to completion: what the engine spends before their first tokens (TTFT minus HTTP)."""
    engine, label = _engine(args, method, args.max_batched or args.batch * args.input_len)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    warm_up(engine, [int(x) for x in torch.randint(100, 20000, (16,), generator=gen)])
    count = [0]

    def burst(engine) -> int:
        steps = 0
        for _ in range(args.batch):  # fresh prompts: nothing for a prefix cache to find
            count[0] += 1
            prompt = [int(x) for x in torch.randint(100, 20000, (args.input_len,), generator=gen)]
            engine.add_request(f"b{count[0]}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        return steps

    burst(engine)  # compiles and allocations of this shape happen here, untimed
    reps = max(2, args.steps // 10)
    walls = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        steps = burst(engine)
        _sync()
        walls.append((time.perf_counter() - t0) * 1e3)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            burst(engine)
        _sync()
    fams, top, _spans = _kernel_table(prof, reps)
    _close(engine)
    walls.sort()
    return {
        "method": label,
        "batch": args.batch,
        "input_len": args.input_len,
        "steps_per_burst": steps,
        "wall_ms_per_burst": walls[len(walls) // 2],
        "wall_ms_min": walls[0],
        "device_us_per_burst": sum(fams.values()),
        "families_us_per_burst": fams,
        "top_kernels": top,  # their us_per_step / calls_per_step are per burst here
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--methods", default="bf16,int4-bdr128")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument(
        "--steps",
        type=int,
        default=50,
        help="decode steps timed (--prefill: steps // 10 bursts, at least 2)",
    )
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument(
        "--max-batched",
        type=int,
        default=None,
        help="chunk budget (decode: 4096; --prefill: every prompt in one step)",
    )
    p.add_argument("--out", default=".")
    p.add_argument("--trace", action="store_true", help="also write each method's timeline")
    p.add_argument("--prefill", action="store_true", help="time first tokens, not decode steps")
    args = p.parse_args()
    unit = "burst" if args.prefill else "step"
    rows = []
    for m in args.methods.split(","):
        r = profile_prefill(args, m) if args.prefill else profile_method(args, m)
        rows.append(r)
        if args.prefill:
            print(f"== {m}: {r['steps_per_burst']} step(s), wall {r['wall_ms_per_burst']:.2f} ms "
                  f"(min {r['wall_ms_min']:.2f}), device {r['device_us_per_burst'] / 1e3:.2f} ms",
                  flush=True)  # fmt: skip
        else:
            print(f"== {m}: wall {r['wall_ms_per_step']:.3f} ms/step, device "
                  f"{r['device_us_per_step'] / 1e3:.3f} ms/step", flush=True)  # fmt: skip
        for k in r["top_kernels"][:12]:
            print(f"   {k['us_per_step']:8.1f} us x{k['calls_per_step']:.0f}  {k['family']:16s} "
                  f"{k['name'][:90]}")  # fmt: skip
    stem = "profile_prefill" if args.prefill else "profile_step"
    flag = "--prefill " if args.prefill else ""
    out = Path(args.out) / f"{stem}_b{args.batch}.json"
    out.write_text(json.dumps({
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "torch": torch.__version__, "command": f"python benchmarks/profile_step.py {flag}"
        f"--methods {args.methods} --batch {args.batch} --input-len {args.input_len}",
        "rows": rows}, indent=1))  # fmt: skip
    fams = sorted({f for r in rows for f in r[f"families_us_per_{unit}"]})
    what = (f"burst of {args.batch} x {args.input_len}-token prompts" if args.prefill
            else f"decode step (batch {args.batch})")  # fmt: skip
    print(f"\nus per {what} by kernel family")
    print(f"{'family':18s}" + "".join(f"{r['method']:>16s}" for r in rows))
    for f in fams:
        print(f"{f:18s}" + "".join(f"{r[f'families_us_per_{unit}'].get(f, 0):16.1f}" for r in rows))
    print(f"{'device total':18s}" + "".join(f"{r[f'device_us_per_{unit}']:16.1f}" for r in rows))
    print(f"{'wall':18s}" + "".join(f"{r[f'wall_ms_per_{unit}'] * 1e3:16.1f}" for r in rows))
    if not args.prefill:
        for key, label in (("inside_steps_us_per_step", "idle in step"),
                           ("between_steps_us_per_step", "idle between")):  # fmt: skip
            print(f"{label:18s}" + "".join(f"{r['idle_gaps'][key]:16.1f}" for r in rows))


if __name__ == "__main__":
    main()
