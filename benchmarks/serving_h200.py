"""Real serving runs on the H200: ``sawkv serve`` (dummy Qwen3-8B) loaded by ``sawkv bench serve``.

Every call fits the device tool's 10-minute limit by running one slice of the grid: some
methods (one GPU each, in parallel) x some workloads at some concurrency levels, against one
server start per method. Rows are appended to ``$OUT/serving_<method>.json`` as each level
finishes, so a call cut short keeps what it measured; ``merge`` gathers the slices into
``benchmarks/results/serving_h200.json``, a plot and ratios against bf16.

    # one H200, one method per call (python3 benchmarks/serving_h200.py plan: the whole grid)
    bash benchmarks/serving_h200.sh run --methods bf16 --workload long=1,16,64 --workload short
    # several GPUs: methods in parallel, one server per GPU
    bash benchmarks/serving_h200.sh run --methods bf16,int8,int4-bdr128,default --gpus 0,1,2,3 \
        --workload reasoning
    # the step-time breakdown (host vs device; prefill / decode / mixed), offline, no HTTP
    bash benchmarks/serving_h200.sh offline --methods int4-bdr128 --workload long=64
    python3 benchmarks/serving_h200.py merge DIR... --out benchmarks/results/serving_h200.json

Each method leaves three files (rows, server log, metrics); the device tool brings back only a
few files per call, so end the device command with ``cd $OUT && tar czf res.tgz * `` and remove
the directories (a session lost a JSON that way).

``--workload NAME[=c1,c2]`` (repeatable): long D(16384, 1024) c in {1, 16, 64, 128}; reasoning
D(1024, 4096) c = 256; short D(256, 1024) c in {1, 16, 64, 128}. ``default`` starts the server
without ``--kv-cache-dtype`` (the row carries the method the server reports).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from sawkv.cli import main; main()"]
# (input_len, output_len, {concurrency: num_requests}); request counts keep each level to a
# few minutes on one H200 (a 16K prefill takes ~0.8 s alone, a decode step 7-45 ms)
WORKLOADS = {
    "long": (16384, 1024, {1: 2, 16: 16, 64: 64, 128: 128}),
    "reasoning": (1024, 4096, {256: 256}),
    "short": (256, 1024, {1: 3, 16: 32, 64: 64, 128: 128}),
}
METHODS = ("bf16", "int8", "int4-bdr128", "default")
# One H200 per call, each under 10 minutes (estimates include ~2 min of server start: dummy
# weights, torch.compile, CUDA-graph capture)
PLAN = (
    (("long=1,16,64", "short"), "~7 min"),
    (("long=128",), "~7 min"),
    (("reasoning",), "~6.5 min"),
)
ENGINE_ARGS = ("--load-format dummy --max-model-len 17920 --max-num-seqs 256 "
               "--max-num-batched-tokens 16384")  # fmt: skip


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _env(gpu: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def _wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the server was not healthy after {timeout_s:.0f} s")


def parse_workloads(specs: list[str], override: tuple[int | None, int | None] = (None, None)):
    """``["long=1,16", "short"]`` -> ``[(name, input_len, output_len, [(c, num_requests)])]``;
    ``override`` replaces the lengths (smoke tests)."""
    out = []
    for spec in specs:
        name, _, levels = spec.partition("=")
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)}")
        in_len, out_len, table = WORKLOADS[name]
        cs = [int(c) for c in levels.split(",")] if levels else sorted(table)
        out.append((name, override[0] or in_len, override[1] or out_len,
                    [(c, table.get(c, max(8, 2 * c))) for c in cs]))  # fmt: skip
    return out


def run_method(args, method: str, gpu: str | None, port: int, deadline: float) -> None:
    """Start one server, run the chosen workloads and levels against it, stop it."""
    out = Path(args.out)
    tag = method.replace("/", "_")
    cmd = [*CLI, "serve", args.model, *args.engine_args.split(), "--port", str(port),
           "--log-level", "warning"]  # fmt: skip
    if method != "default":
        cmd += ["--kv-cache-dtype", method]
    log = open(out / f"server_{tag}.log", "a")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(gpu), cwd=ROOT)
    try:
        _wait_healthy(port, proc, min(args.startup_timeout, deadline - time.monotonic()))
        _log(f"{method} (gpu {gpu}): server up in {time.monotonic() - t0:.0f} s")
        for name, in_len, out_len, levels in args.grid:
            for c, n in levels:
                if not _bench_level(args, method, port, name, in_len, out_len, c, n, deadline):
                    return
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError, OSError) as e:
        _log(f"{method}: FAILED: {e} (see server_{tag}.log)")
    finally:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                (out / f"metrics_{tag}.txt").write_text(r.read().decode())
        except OSError:
            pass
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def level_seed(in_len: int, out_len: int, concurrency: int) -> int:
    """The prompt seed of one level. Each level is its own ``sawkv bench serve`` call, and the
    server keeps its prefix cache between them: with one seed, the first prompts of a level
    would repeat the previous level's and skip their prefill (half of c=128's prompts were c=64's
    on 2026-12-07), which flatters throughput and splits TTFT into hits and misses."""
    return (in_len * 1_000_003 + out_len * 1_009 + concurrency) % 2**31


def _bench_level(args, method, port, name, in_len, out_len, c, n, deadline) -> bool:
    """One ``sawkv bench serve`` level; False when the deadline leaves no time for more."""
    left = deadline - time.monotonic()
    if left < 20:
        _log(f"{method}: no time left for {name} c={c}")
        return False
    tag = method.replace("/", "_")
    bench = [*CLI, "bench", "serve", "--base-url", f"http://127.0.0.1:{port}/v1",
             "--input-len", str(in_len), "--output-len", str(out_len), "--concurrency", str(c),
             "--num-requests", str(n), "--json", str(Path(args.out) / f"serving_{tag}.json"),
             "--append", "--seed", str(level_seed(in_len, out_len, c))]  # fmt: skip
    t = time.monotonic()
    try:
        subprocess.run(bench, env=_env(None), cwd=ROOT, timeout=left, check=True)
    except subprocess.TimeoutExpired:
        _log(f"{method} {name} c={c}: cut at the deadline")
        return False
    _log(f"{method} {name} c={c} n={n}: {time.monotonic() - t:.0f} s")
    return True


def run_offline(args, method: str, gpu: str | None, deadline: float) -> None:
    """``sawkv bench throughput`` in process: offline rows with the step breakdown."""
    tag = method.replace("/", "_")
    for _name, in_len, out_len, levels in args.grid:
        for c, n in levels:
            cmd = [*CLI, "bench", "throughput", "--model", args.model, *args.engine_args.split(),
                   "--input-len", str(in_len), "--output-len", str(out_len),
                   "--concurrency", str(c), "--num-requests", str(args.num_requests or n),
                   "--json", str(Path(args.out) / f"offline_{tag}.json"), "--append"]  # fmt: skip
            if method != "default":
                cmd += ["--kv-cache-dtype", method]
            try:
                left = deadline - time.monotonic()
                subprocess.run(cmd, env=_env(gpu), cwd=ROOT, timeout=left, check=True)
            except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
                _log(f"{method} offline c={c}: {e}")
                return


def cmd_plan(args) -> None:
    """Print the calls of the whole grid on one H200 with their expected wall time."""
    for method in METHODS:
        for workloads, minutes in PLAN:
            flags = " ".join(f"--workload {w}" for w in workloads)
            print(f"bash benchmarks/serving_h200.sh run --methods {method} {flags}   # {minutes}")
    for method in ("bf16", "int4-bdr128"):
        print(f"bash benchmarks/serving_h200.sh offline --methods {method} --workload long=64 "
              "--num-requests 32   # ~5 min")  # fmt: skip


def _parallel(args, target) -> None:
    args.grid = parse_workloads(args.workload, (args.input_len, args.output_len))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    gpus = args.gpus.split(",") if args.gpus else [None]
    if len(methods) > len(gpus):
        raise SystemExit(f"{len(methods)} methods need as many --gpus (one server per GPU)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    threads = [
        threading.Thread(target=target, args=(args, m, g, i, deadline))
        for i, (m, g) in enumerate(zip(methods, gpus))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def cmd_run(args) -> None:
    _parallel(args, lambda a, m, g, i, d: run_method(a, m, g, args.port + i, d))


def cmd_offline(args) -> None:
    _parallel(args, lambda a, m, g, i, d: run_offline(a, m, g, d))


def cmd_merge(args) -> None:
    sys.path.insert(0, str(ROOT))
    from sawkv.bench.report import merge_runs, plot_runs, print_table, save_runs

    rows: list[dict] = []
    for src in args.inputs:
        paths = sorted(Path(src).rglob("*.json")) if Path(src).is_dir() else [Path(src)]
        for p in paths:
            data = json.loads(p.read_text())
            if isinstance(data, dict) and isinstance(data.get("runs"), list):
                rows = merge_runs(rows, data["runs"])
    out = Path(args.out)
    meta = {"title": f"sawkv serve, dummy Qwen3-8B, one {args.device}", "device": args.device,
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    if args.commit:
        meta["commit"] = args.commit
    if args.note:
        meta["notes"] = args.note
    rows = save_runs(out, rows, append=out.is_file(), **meta)["runs"]
    print_table(rows, meta["title"])
    plot_runs(rows, out.with_suffix(".png"), meta["title"])
    print_ratios(rows)


def print_ratios(rows: list[dict]) -> None:
    """Each method's output tok/s and TTFT p50 against bf16 on the same workload and level."""
    base = {(r["mode"], r["input_len"], r["output_len"], r["concurrency"]): r
            for r in rows if r["method"] == "bf16"}  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["mode"], r["input_len"], r["concurrency"])):
        b = base.get((r["mode"], r["input_len"], r["output_len"], r["concurrency"]))
        if b is None or r is b or not b["output_tok_s"]:
            continue
        ttft = (r["ttft_s"]["p50"] or 0) / (b["ttft_s"]["p50"] or float("inf"))
        print(f"{r['mode']:7} D({r['input_len']},{r['output_len']}) c={r['concurrency']:<3} "
              f"{r['method']:>14}: {r['output_tok_s'] / b['output_tok_s']:.2f}x bf16 tok/s, "
              f"TTFT p50 {ttft:.2f}x, errors {r['errors']}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "offline"):
        q = sub.add_parser(name)
        q.add_argument("--methods", default="bf16")
        q.add_argument("--workload", action="append", required=True,
                       help="NAME[=c1,c2] (repeatable): long, reasoning, short")  # fmt: skip
        q.add_argument("--gpus", default=None, help="one GPU per method: 0,1,2,3")
        q.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/h200"))
        q.add_argument("--budget-s", type=float, default=560, help="stop before this")
        q.add_argument("--startup-timeout", type=float, default=420)
        q.add_argument("--port", type=int, default=8300)
        q.add_argument("--num-requests", type=int, default=None, help="offline: override")
        q.add_argument("--model", default="qwen3-8b")
        q.add_argument("--engine-args", default=ENGINE_ARGS, help="engine options of serve")
        q.add_argument("--input-len", type=int, default=None, help="override (smoke tests)")
        q.add_argument("--output-len", type=int, default=None, help="override (smoke tests)")
    sub.add_parser("plan")
    m = sub.add_parser("merge")
    m.add_argument("inputs", nargs="+", help="directories or JSON files with 'runs'")
    m.add_argument("--out", default="benchmarks/results/serving_h200.json")
    m.add_argument("--device", default="H200", help="GPU the rows were measured on")
    m.add_argument("--commit", default=None, help="commit the rows were measured at")
    m.add_argument("--note", action="append", default=[], help="free-text note (repeatable)")
    args = p.parse_args()
    {"run": cmd_run, "offline": cmd_offline, "merge": cmd_merge, "plan": cmd_plan}[args.cmd](args)


if __name__ == "__main__":
    main()
