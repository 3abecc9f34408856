"""End-to-end serving benchmark: BF16 vs INT4 vs INT4-BDR128 KV cache on one GPU.

Dummy (random) weights with a real model's shape (default Qwen3-8B); throughput does not depend
on weight values, nor on what the pages hold. Per method, in one process:

(a) capacity: pages the engine allocates at ``--gpu-util`` after weights and activations, and
    the most concurrent sequences of ``prompt_len + output_len`` tokens they hold;
(b) prefill: real 16K-token prompts through the engine (TTFT of a lone request, prefill tok/s);
(c) decode: ``c`` sequences with a context of ``prompt_len + output_len / 2`` tokens (the mean
    context over the generation) are placed in the pages and stepped through the full engine
    (scheduler, CUDA-graph decode, sampler) for ``--steps`` steps: time per output token and
    steady-state output tok/s. Beyond capacity only ``capacity`` sequences run (the rest wait);
(d) end-to-end output tok/s of the whole workload (prefill included), composed from (b) and
    (c): requests arrive together and run in waves of min(c, capacity); each wave prefills its
    prompts, then decodes ``output_len`` steps. Mean TTFT at concurrency c is modeled the same way.

The decode step is compared with the memory roofline: (weight bytes + KV bytes read) / copy
bandwidth measured in the same run.

    PYTHONPATH=. python benchmarks/bench_serving.py --out benchmarks/results/serving_h100.json
    python benchmarks/bench_serving.py --plot benchmarks/results/serving_h100.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time

import torch

from sawkv.engine.llm_engine import LLMEngine
from sawkv.engine.sampling_params import SamplingParams
from sawkv.engine.sequence import Sequence, SequenceStatus

WORKLOADS = {"long": (16384, 1024), "short": (256, 1024)}


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes/s of a device-to-device copy, counting read + write."""
    x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t)
    del x, y
    torch.cuda.empty_cache()
    return bw


def capacity(engine: LLMEngine, num_tokens: int) -> int:
    bs = engine.spec.block_size
    return engine.block_manager.num_blocks // math.ceil(num_tokens / bs)


def measure_prefill(engine: LLMEngine, prompt_len: int, n: int) -> dict:
    """n prompts of prompt_len random tokens, max_tokens=1; one chunk per step."""
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    engine.add_request("warm", torch.randint(0, 1000, (prompt_len,), generator=g).tolist(), params)
    while engine.has_unfinished_requests():
        engine.step()
    t0 = time.perf_counter()
    first = None
    for i in range(n):
        ids = torch.randint(0, engine.model_config.vocab_size, (prompt_len,), generator=g)
        engine.add_request(f"p{i}", ids.tolist(), params)
    while engine.has_unfinished_requests():
        outs = engine.step()
        if first is None and outs:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"prompt_len": prompt_len, "num_prompts": n, "seconds": total,
            "prefill_tok_s": n * prompt_len / total, "ttft_first_s": first}  # fmt: skip


def inject(engine: LLMEngine, n: int, ctx_len: int) -> None:
    """Place n running sequences whose first ctx_len - 1 tokens are already in the pages (their
    values do not matter for speed), so the next steps are pure decode at that context."""
    params = SamplingParams(temperature=0, max_tokens=10**6, ignore_eos=True)
    for i in range(n):
        seq = Sequence(f"d{i}", [(7 * i + j) % 1000 for j in range(ctx_len)], params)
        if not engine.block_manager.ensure_slots(seq, ctx_len):
            raise RuntimeError(f"pool full at sequence {i} of {n}")
        seq.num_computed_tokens = ctx_len - 1
        seq.status = SequenceStatus.RUNNING
        engine.scheduler.running.append(seq)
        engine.seqs[seq.request_id] = seq


def measure_decode(engine: LLMEngine, n: int, ctx_len: int, steps: int) -> tuple[float, float]:
    """(mean seconds per engine decode step, seconds of the model forward alone) for n
    sequences at context ~ctx_len. The forward alone is a replay of the step's CUDA graph
    (same inputs again), so the difference is host work: scheduling, input preparation, LM
    head and sampling."""
    inject(engine, n, ctx_len)
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        outs = engine.step()
        assert len(outs) == n
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    graphs = engine.runner.graphs
    bs = next(b for b in graphs.sizes if b >= n)
    t = time.perf_counter()
    for _ in range(steps):
        graphs.graphs[bs].replay()
    torch.cuda.synchronize()
    forward = (time.perf_counter() - t) / steps
    for rid in list(engine.seqs):
        engine.abort_request(rid)
    return dt, forward


def measure_real(engine: LLMEngine, c: int, prompt_len: int, output_len: int) -> dict:
    """A real run: c requests at once through add_request/step (chunked prefill mixed with
    decode by the scheduler); output tok/s over the whole run and mean TTFT."""
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    for i in range(c):
        ids = torch.randint(0, engine.model_config.vocab_size, (prompt_len,), generator=g)
        engine.add_request(f"real{i}", ids.tolist(), params)
    ttft: dict[str, float] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            ttft.setdefault(out.request_id, time.perf_counter() - t0)
    total = time.perf_counter() - t0
    return {"concurrency": c, "prompt_len": prompt_len, "output_len": output_len,
            "seconds": total, "e2e_tok_s": c * output_len / total,
            "mean_ttft_s": sum(ttft.values()) / c}  # fmt: skip


def run_method(args, method: str, bw: float) -> dict:
    t_init = time.perf_counter()
    engine = LLMEngine.from_args(
        args.model, kv_cache_dtype=method, load_format="dummy", max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, gpu_memory_utilization=args.gpu_util,
        enable_prefix_caching=False, tensor_parallel_size=args.tensor_parallel_size,
    )  # fmt: skip
    tp = args.tensor_parallel_size
    cfg, spec = engine.model_config, engine.spec
    res = {
        "method": method, "init_s": time.perf_counter() - t_init,
        "kv_bytes_per_token": spec.bytes_per_token, "num_blocks": engine.block_manager.num_blocks,
        "block_size": spec.block_size, "kv_cache_gib": engine.stats()["kv_cache_bytes"] / 2**30,
    }  # fmt: skip
    # per GPU: with tensor parallelism each rank reads 1/tp of the weights and (spec is rank
    # 0's) its own KV heads' pages
    weight_bytes = (cfg.num_params - cfg.vocab_size * cfg.hidden_size) * 2 / tp
    for name, (plen, olen) in WORKLOADS.items():
        if name not in args.workloads.split(","):
            continue
        cap = capacity(engine, plen + olen)
        n_pre = args.prefill_prompts if name == "long" else 64
        pre = measure_prefill(engine, plen, n_pre)
        t_prompt = plen / pre["prefill_tok_s"]
        rows = []
        for c in args.concurrency:
            n = min(c, cap)
            ctx = plen + olen // 2
            dt, forward = measure_decode(engine, n, ctx, args.steps)
            kv_bytes = n * ctx * spec.bytes_per_token
            roof = (weight_bytes + kv_bytes) / bw
            waves = math.ceil(c / n)
            e2e_time = sum(
                min(n, c - w * n) * t_prompt + olen * dt for w in range(waves)
            )  # equal-length requests: each wave prefills, then decodes together
            ttft = sum(
                (w * (n * t_prompt + olen * dt) + (i + 1) * t_prompt)
                for w in range(waves) for i in range(min(n, c - w * n))
            ) / c  # fmt: skip
            rows.append({
                "concurrency": c, "running": n, "context": ctx, "step_s": dt, "tpot_s": dt,
                "forward_s": forward, "host_s": dt - forward,
                "decode_tok_s": n / dt, "e2e_tok_s": c * olen / e2e_time, "mean_ttft_s": ttft,
                "kv_gb_per_step": kv_bytes / 1e9, "weight_gb": weight_bytes / 1e9,
                "roofline_step_s": roof, "roofline_frac": roof / dt,
            })  # fmt: skip
            if tp > 1:  # one all-reduce after o_proj and down_proj per layer, one after embed
                per_call = engine.runner.measure_all_reduce(n)
                rows[-1]["all_reduce_s_per_call"] = per_call
                rows[-1]["all_reduce_s_per_step"] = per_call * (2 * cfg.num_layers + 1)
            print(method, name, rows[-1], flush=True)
        res[name] = {"capacity": cap, "prefill": pre, "rows": rows}
        if name == "long" and args.real_check:
            # check of the composed end-to-end model on a smaller real run
            real = measure_real(engine, 16, plen, args.real_check)
            dt16 = next(r["step_s"] for r in rows if r["concurrency"] == 16)
            real["composed_tok_s"] = 16 * args.real_check / (16 * t_prompt + args.real_check * dt16)
            res[name]["real_check"] = real
            print(method, "real", real, flush=True)
    res["max_concurrent_16k"] = engine.block_manager.num_blocks * spec.block_size // 16384
    if tp > 1:
        engine.runner.shutdown()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return res


def plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(path))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in data["methods"]:
        for ax, wl in zip(axes[:2], ("long", "short")):
            if wl not in m:
                continue
            rows = m[wl]["rows"]
            cs = [r["concurrency"] for r in rows]
            ax.plot(cs, [r["e2e_tok_s"] for r in rows], "o-", label=f"{m['method']} end-to-end")
            ax.plot(cs, [r["decode_tok_s"] for r in rows], "x--", label=f"{m['method']} decode")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{wl}: {WORKLOADS[wl][0]} prompt / {WORKLOADS[wl][1]} output tokens")
            ax.set_xlabel("concurrency")
            ax.set_ylabel("output tok/s")
    axes[0].legend(fontsize=7)
    names = [m["method"] for m in data["methods"]]
    axes[2].bar(names, [m["max_concurrent_16k"] for m in data["methods"]])
    axes[2].set_title("concurrent 16K-token sequences held")
    tp = data.get("tensor_parallel_size", 1)
    where = f"{data['device']} x{tp}, TP={tp}" if tp > 1 else data["device"]
    fig.suptitle(f"{data['model']} (dummy weights), {where}")
    fig.tight_layout()
    out = path.replace(".json", ".png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


def _provenance(tp: int) -> dict:
    import datetime
    import os
    import subprocess

    commit = os.environ.get("SAWKV_COMMIT")  # the device copy of the tree has no .git
    if commit is None:
        try:
            git = ["git", "rev-parse", "HEAD"]
            commit = subprocess.run(git, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "tensor_parallel_size": tp,
            "num_gpus": torch.cuda.device_count()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--methods", default="bf16,int4,int4-bdr128")
    p.add_argument("--concurrency", default="1,16,64,128")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prefill-prompts", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=17920)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--workloads", default="long,short")
    p.add_argument("--gpu-util", type=float, default=0.9)
    p.add_argument("--real-check", type=int, default=64,
                   help="output tokens of a real 16-request long run checking the composition "
                   "(0: skip)")  # fmt: skip
    p.add_argument("--out", default="benchmarks/results/serving_h100.json")
    p.add_argument("--plot", default=None, help="only plot this results JSON")
    args = p.parse_args()
    if args.plot:
        return plot(args.plot)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    results = {"model": args.model, "device": torch.cuda.get_device_name(),
               "copy_bandwidth_tb_s": bw / 1e12, "args": vars(args), "methods": []}  # fmt: skip
    results.update(_provenance(args.tensor_parallel_size))
    for method in args.methods.split(","):
        results["methods"].append(run_method(args, method, bw))
        json.dump(results, open(args.out, "w"), indent=1)
    base = results["methods"][0]
    for m in results["methods"]:
        r = m["max_concurrent_16k"] / max(1, base["max_concurrent_16k"])
        print(f"{m['method']}: {m['max_concurrent_16k']} x 16K seqs ({r:.2f}x {base['method']})")


if __name__ == "__main__":
    main()
