"""``sawkv bench serve`` (HTTP load generator) and ``sawkv bench throughput`` (offline engine).

Only typer is imported at module level; aiohttp, torch and the engine load inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sawkv.server.cli import AsyncScheduling

bench_app = typer.Typer(
    help="Serving benchmarks: an OpenAI-compatible load generator and an offline engine run.",
    no_args_is_help=True,
)

InputLen = Annotated[int, typer.Option(help="prompt tokens per request (exact)")]
OutputLen = Annotated[int, typer.Option(help="output tokens per request")]
Concurrency = Annotated[str, typer.Option(help="requests in flight; a comma list sweeps: 1,16,64")]
NumRequests = Annotated[
    int | None, typer.Option(help="requests per concurrency level (default max(8, 2 x conc))")
]
JsonPath = Annotated[Path | None, typer.Option("--json", help="write {'runs': [...]} here")]
Append = Annotated[bool, typer.Option(help="merge rows into an existing --json file")]
PlotPath = Annotated[Path | None, typer.Option(help="write a PNG plot of all runs in the JSON")]
Dataset = Annotated[str, typer.Option(help="random (token ids) | text (windows of --text)")]


def parse_concurrency(spec: str) -> list[int]:
    """``"1,16,64"`` -> ``[1, 16, 64]``; raises ``typer.BadParameter`` for bad values."""
    try:
        levels = [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        msg = f"--concurrency must be comma-separated integers, got {spec!r}"
        raise typer.BadParameter(msg) from None
    if not levels or min(levels) < 1:
        raise typer.BadParameter(f"--concurrency needs integers >= 1, got {spec!r}")
    return levels


def _check_lens(input_len: int, output_len: int) -> None:
    if input_len < 1 or output_len < 1:
        raise typer.BadParameter(
            f"--input-len and --output-len must be >= 1, got {input_len}, {output_len}"
        )


def _prompts(dataset: str, n: int, input_len: int, seed: int, token_range: str,
             text: str, tokenizer: str | None) -> list[list[int]]:  # fmt: skip
    from sawkv.bench.datasets import random_prompts, text_prompts, tokenize_text

    if dataset == "random":
        try:
            low, high = (int(x) for x in token_range.split(","))
        except ValueError:
            msg = f"--token-range must be LOW,HIGH, got {token_range!r}"
            raise typer.BadParameter(msg) from None
        try:
            return random_prompts(n, input_len, token_range=(low, high), seed=seed)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    if dataset == "text":
        if tokenizer is None:
            raise typer.BadParameter("--dataset text needs --tokenizer (model name or HF dir)")
        try:
            return text_prompts(tokenize_text(tokenizer, text), n, input_len, seed=seed)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    raise typer.BadParameter(f"--dataset must be random or text, got {dataset!r}")


def _fit_range(token_range: str, vocab_size: int) -> str:
    """Random ids must exist in a small (test) vocabulary: clip ``[LOW, HIGH)`` to it."""
    try:
        low, high = (int(x) for x in token_range.split(","))
    except ValueError:
        raise typer.BadParameter(f"--token-range must be LOW,HIGH, got {token_range!r}") from None
    high = min(high, vocab_size)
    return f"{low if low < high else 0},{high}"


def _finish(rows: list[dict], json_path: Path | None, append: bool, plot: Path | None,
            meta: dict) -> None:  # fmt: skip
    from sawkv.bench.report import plot_runs, print_table, save_runs

    print_table(rows)
    all_rows = rows
    if json_path is not None:
        all_rows = save_runs(json_path, rows, append=append, **meta)["runs"]
        typer.echo(f"wrote {json_path} ({len(all_rows)} runs)")
    if plot is not None:
        plot_runs(all_rows, plot, meta.get("title", ""))
        typer.echo(f"wrote {plot}")


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn())  # fmt: skip


@bench_app.command("serve")
def serve_cmd(
    base_url: Annotated[str, typer.Option(help="OpenAI API root")] = "http://127.0.0.1:8000/v1",
    input_len: InputLen = 1024,
    output_len: OutputLen = 128,
    concurrency: Concurrency = "1",
    num_requests: NumRequests = None,
    model: Annotated[str | None, typer.Option(help="model id (default: /v1/models)")] = None,
    method: Annotated[
        str | None, typer.Option(help="row label (default: the server's KV cache dtype)")
    ] = None,
    dataset: Dataset = "random",
    token_range: Annotated[str, typer.Option(help="random ids in [LOW, HIGH)")] = "1000,30000",
    text: Annotated[str, typer.Option(help="sawkv text for --dataset text")] = "austen",
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer for --dataset text")] = None,
    request_rate: Annotated[
        float, typer.Option(help="Poisson arrivals, requests/s (inf: all at once)")
    ] = float("inf"),
    ignore_eos: Annotated[bool, typer.Option(help="ask for exactly --output-len tokens")] = True,
    warmup: Annotated[
        int, typer.Option(help="untimed requests first (also checks the server)")
    ] = 1,
    wait_health: Annotated[float, typer.Option(help="seconds to wait for /health first")] = 0.0,
    request_timeout: Annotated[float, typer.Option(help="seconds without a byte = error")] = 3600,
    api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY")] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="prompt seed; a server's prefix cache keeps earlier runs' prompts, so give "
            "each run against the same server its own seed"
        ),
    ] = 0,
    json_path: JsonPath = None,
    append: Append = False,
    plot: PlotPath = None,
) -> None:
    """Load an OpenAI-compatible server with streamed completions; report tok/s, TTFT, TPOT."""
    import asyncio
    import math

    from sawkv.bench.metrics import server_means, summarize
    from sawkv.bench.serve import run_load, server_histograms, server_info, wait_healthy

    _check_lens(input_len, output_len)
    levels = parse_concurrency(concurrency)
    if not request_rate > 0:
        raise typer.BadParameter(f"--request-rate must be positive, got {request_rate}")

    async def main() -> list[dict]:
        if wait_health > 0:
            await wait_healthy(base_url, wait_health)
        info = await server_info(base_url, api_key)
        served = model or info.get("model")
        if served is None:
            raise typer.BadParameter(f"{base_url}/models lists no model: pass --model")
        label = method or info.get("kv_cache_dtype") or served
        if warmup > 0:
            prompts = _prompts(dataset, warmup, input_len, seed + 999_999, token_range, text,
                               tokenizer)  # fmt: skip
            res, _ = await run_load(base_url, served, prompts, min(output_len, 4), warmup,
                                    ignore_eos=ignore_eos, api_key=api_key)  # fmt: skip
            bad = [r.error for r in res if r.error]
            if bad:
                raise RuntimeError(f"warm-up request failed: {bad[0]}")
        rows = []
        with _progress() as progress:
            for i, c in enumerate(levels):
                n = num_requests or max(8, 2 * c)
                # fresh prompts per level: repeats would be prefix-cache hits on the server
                prompts = _prompts(dataset, n, input_len, seed + 1000 * i, token_range, text,
                                   tokenizer)  # fmt: skip
                task = progress.add_task(f"{label} D({input_len},{output_len}) c={c}", total=n)
                hist0 = await server_histograms(base_url)
                results, duration = await run_load(
                    base_url, served, prompts, output_len, c, request_rate=request_rate,
                    ignore_eos=ignore_eos,
                    api_key=api_key, request_timeout_s=request_timeout,
                    on_done=lambda _r, task=task: progress.advance(task),
                )  # fmt: skip
                rows.append(summarize(
                    results, duration, mode="http", method=label, model=served,
                    input_len=input_len, output_len=output_len, concurrency=c, num_requests=n,
                    request_rate=None if math.isinf(request_rate) else request_rate,
                    dataset=dataset, base_url=base_url,
                ))  # fmt: skip
                # the server's own view, where it exports latency histograms (sawkv, vLLM):
                # TTFT split into queueing and prefill, without HTTP and tokenization
                rows[-1].update(server_means(hist0, await server_histograms(base_url)))
                if "kv_capacity_tokens" in info:  # sawkv: how many such requests fit at once
                    cap = info["kv_capacity_tokens"]
                    seqs = cap // (input_len + output_len)
                    rows[-1].update(kv_capacity_tokens=cap, max_concurrent_seqs=seqs)
        return rows

    try:
        rows = asyncio.run(main())
    except (ConnectionError, TimeoutError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    _finish(rows, json_path, append, plot, {"title": f"sawkv bench serve {base_url}"})


@bench_app.command("throughput")
def throughput_cmd(
    model: Annotated[str, typer.Option(help="model name, HF dir or preset (qwen3-8b...)")] = (
        "smollm2-135m"
    ),
    kv_cache_dtype: Annotated[str, typer.Option(help="auto, bf16, int8, int4-bdr128...")] = "auto",
    input_len: InputLen = 1024,
    output_len: OutputLen = 128,
    concurrency: Concurrency = "16",
    num_requests: NumRequests = None,
    method: Annotated[str | None, typer.Option(help="row label (default: the KV method)")] = None,
    dataset: Dataset = "random",
    token_range: Annotated[str, typer.Option(help="random ids in [LOW, HIGH)")] = "1000,30000",
    text: Annotated[str, typer.Option(help="sawkv text for --dataset text")] = "austen",
    load_format: Annotated[str, typer.Option(help="auto or dummy (random weights)")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cuda or cpu")] = "auto",
    max_model_len: Annotated[int | None, typer.Option()] = None,
    max_num_seqs: Annotated[int | None, typer.Option()] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option()] = None,
    num_gpu_blocks: Annotated[int | None, typer.Option()] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option()] = None,
    enforce_eager: Annotated[bool, typer.Option(help="no CUDA graphs")] = False,
    async_scheduling: AsyncScheduling = None,
    detokenize: Annotated[
        bool, typer.Option(help="turn each output token into text, as a server must")
    ] = True,
    seed: Annotated[int, typer.Option()] = 0,
    json_path: JsonPath = None,
    append: Append = False,
    plot: PlotPath = None,
) -> None:
    """Run the workload through the engine in process (no HTTP); rows have mode "offline" and
    a per-step breakdown (host vs device time, prefill / decode / mixed)."""
    from sawkv.bench.throughput import build_engine, run_offline

    _check_lens(input_len, output_len)
    levels = parse_concurrency(concurrency)
    kwargs = {"max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
              "max_num_batched_tokens": max_num_batched_tokens, "num_gpu_blocks": num_gpu_blocks,
              "gpu_memory_utilization": gpu_memory_utilization}  # fmt: skip
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        engine = build_engine(model, kv_cache_dtype, load_format=load_format, device=device,
                              enforce_eager=enforce_eager, async_scheduling=async_scheduling,
                              seed=seed, **kwargs)  # fmt: skip
    except ValueError as e:  # bad method, model or engine argument: say which
        raise typer.BadParameter(str(e)) from None
    label = method or engine.spec.method.name
    tokenizer = model if dataset == "text" else None
    token_range = _fit_range(token_range, engine.model_config.vocab_size)
    rows = []
    with _progress() as progress:
        for i, c in enumerate(levels):
            n = num_requests or max(8, 2 * c)
            prompts = _prompts(dataset, n, input_len, seed + 1000 * i, token_range, text,
                               tokenizer)  # fmt: skip
            task = progress.add_task(f"{label} D({input_len},{output_len}) c={c}", total=n)
            advance = lambda task=task: progress.advance(task)  # noqa: E731
            rows.append(run_offline(engine, prompts, output_len, c, on_done=advance,
                                    detokenize=detokenize, method=label,
                                    model=model))  # fmt: skip
    for row in rows:
        _print_breakdown(row)
    _finish(rows, json_path, append, plot, {"title": f"sawkv bench throughput {model}"})


def _print_breakdown(row: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{row['method']} c={row['concurrency']}: time per step (ms)")
    cols = ("kind", "steps", "seqs", "tokens", "wall", "device", "host", "host %", "schedule",
            "plan", "execute", "post")  # fmt: skip
    for c in cols:
        table.add_column(c, justify="left" if c == "kind" else "right")
    for kind, b in row["step_breakdown"].items():
        table.add_row(
            kind, str(b["steps"]), f"{b['seqs_per_step']:.1f}", f"{b['tokens_per_step']:.0f}",
            f"{b['wall_ms']:.2f}", f"{b['device_ms']:.2f}", f"{b['host_ms']:.2f}",
            f"{100 * b['host_frac']:.1f}", f"{b['schedule_ms']:.2f}", f"{b['plan_ms']:.2f}",
            f"{b['execute_ms']:.2f}", f"{b['post_ms']:.2f}",
        )  # fmt: skip
    Console(width=160).print(table)
