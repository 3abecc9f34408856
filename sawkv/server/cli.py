"""``sawkv serve``: the command's options; registered on the main app in ``sawkv/cli.py``.

Only typer is imported here; the engine, fastapi and uvicorn load when the command runs, so
``sawkv --help`` works without the serving extras.
"""

from __future__ import annotations

from typing import Annotated

import typer

from sawkv.defaults import DEFAULT_KV_METHOD

# shared with `sawkv bench throughput`, which builds the same engine in process
AsyncScheduling = Annotated[
    bool | None,
    typer.Option(help="plan the next step while the GPU runs this one [default: on, one GPU]"),
]


def serve_cmd(
    model: Annotated[
        str, typer.Argument(help="registry name (smollm2-135m...), preset or HF directory")
    ],
    kv_cache_dtype: Annotated[
        str,
        typer.Option(
            help="KV cache: saw-int4 (the model's calibrated recipe), auto, bf16, fp16, int8, "
            "int4, int4-bdr{b}[-kv|-kc]"
        ),
    ] = DEFAULT_KV_METHOD,
    host: Annotated[str, typer.Option(help="address to bind (default: local only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="SAWKV_API_KEY", help="require 'Authorization: Bearer <key>' on /v1"),
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option(help="most requests in flight; more get HTTP 429")
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="name clients pass as 'model' (default: MODEL)")
    ] = None,
    max_model_len: Annotated[int | None, typer.Option(help="context length limit")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="sequences per step")] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option(help="tokens per step")] = None,
    block_size: Annotated[int | None, typer.Option(help="tokens per KV page")] = None,
    num_gpu_blocks: Annotated[int | None, typer.Option(help="KV pages (overrides memory)")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(help="fraction of GPU")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (bf16 GPU, fp32 CPU)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cuda or cpu")] = None,
    load_format: Annotated[str | None, typer.Option(help="auto or dummy (random weights)")] = None,
    enforce_eager: Annotated[bool, typer.Option(help="no CUDA graphs")] = False,
    async_scheduling: AsyncScheduling = None,
    tensor_parallel_size: Annotated[
        int, typer.Option("--tensor-parallel-size", "-tp", help="GPUs sharing the model")
    ] = 1,
    enable_prefix_caching: Annotated[bool, typer.Option(help="share full prompt pages")] = True,
    batch_invariant: Annotated[
        bool | None,
        typer.Option(help="greedy output independent of the batch (default: on for CPU)"),
    ] = None,
    drain_timeout: Annotated[
        float, typer.Option(help="seconds requests may run after SIGTERM before being ended")
    ] = 30.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (completions, chat, SSE, /metrics)."""
    try:
        from sawkv.server.api_server import serve
    except ImportError as e:
        typer.echo(f"{e}: install the serving extras (pip install 'sawkv[serve]')", err=True)
        raise typer.Exit(1) from e
    engine_kwargs = {
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
        "block_size": block_size,
        "num_gpu_blocks": num_gpu_blocks,
        "gpu_memory_utilization": gpu_memory_utilization,
        "dtype": dtype,
        "device": device,
        "load_format": load_format,
        "async_scheduling": async_scheduling,
        "batch_invariant": batch_invariant,
    }
    engine_kwargs = {k: v for k, v in engine_kwargs.items() if v is not None}
    if enforce_eager:
        engine_kwargs["enforce_eager"] = True
    if tensor_parallel_size != 1:
        engine_kwargs["tensor_parallel_size"] = tensor_parallel_size
    if not enable_prefix_caching:
        engine_kwargs["enable_prefix_caching"] = False
    if drain_timeout < 0:
        raise typer.BadParameter(f"must be >= 0, got {drain_timeout}", param_hint="--drain-timeout")
    serve(
        model,
        kv_cache_dtype=kv_cache_dtype,
        host=host,
        port=port,
        api_key=api_key,
        max_queue=max_queue,
        served_model_name=served_model_name,
        log_level=log_level,
        drain_timeout_s=drain_timeout,
        **engine_kwargs,
    )
