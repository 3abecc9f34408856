"""Start tensor parallelism: one process per rank, rank 0 being the engine's own process.

``start_tensor_parallel`` (called by :class:`sawkv.engine.llm_engine.LLMEngine` when
``tensor_parallel_size > 1``) either spawns ranks 1..tp-1 with ``multiprocessing`` (spawn) and
a TCP rendezvous on 127.0.0.1, or, under ``torchrun`` (``RANK``/``WORLD_SIZE`` set, world size
equal to tp), joins the group from the environment: there rank 0 returns its runner and the
other ranks run rank 0's method calls inside the ``LLMEngine`` constructor, then exit.

On CUDA rank r uses ``cuda:r``; on CPU the collectives run on gloo.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import weakref

import torch
import torch.multiprocessing as mp

from sawkv.config import EngineConfig, ModelConfig
from sawkv.distributed import parallel_state as ps
from sawkv.distributed.layers import check_tensor_parallel_size
from sawkv.distributed.runner import TPModelRunner, worker_loop


def _rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    dev = config.torch_device
    if dev.type == "cuda":
        return dataclasses.replace(config, device=f"cuda:{rank}")
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, tp: int, init_method: str, runner_args: tuple) -> None:
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # a daemon process may not fork a pool
    config, *rest = runner_args
    config = _rank_config(config, rank)
    ps.init_tensor_parallel(rank, tp, init_method, config.torch_device)
    try:
        worker_loop(TPModelRunner(config, *rest))
    finally:
        ps.destroy_tensor_parallel()


class _Shutdown:
    """Stops the workers and leaves the group; run once, when rank 0's runner is collected or
    at exit (a ``weakref.finalize`` callback must not hold the runner itself)."""

    def __init__(self, procs: list) -> None:
        self.procs, self.done = procs, False
        self.started: threading.Event | None = None

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        if self.started is not None:
            self.started.set()
        try:
            ps.broadcast_object(("exit", ()))
        except Exception:  # noqa: BLE001 - a dead peer must not block shutdown
            pass
        # leave the group while the workers do the same, then wait for them to exit
        ps.destroy_tensor_parallel()
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def _attach_shutdown(runner: TPModelRunner, procs: list) -> _Shutdown:
    """Rank 0: stop the workers when ``runner.shutdown()`` is called, when the runner is
    collected, or at exit."""
    shutdown = _Shutdown(procs)
    runner._finalizer = weakref.finalize(runner, shutdown)
    return shutdown


def start_tensor_parallel(
    config: EngineConfig,
    model_config: ModelConfig,
    model_dir,
    spec,
    max_model_len: int,
    key_means: torch.Tensor | None,
) -> TPModelRunner:
    """Start ``config.tensor_parallel_size`` ranks and return rank 0's runner (its
    :meth:`~TPModelRunner.call` runs a method on every rank; ``shutdown()`` stops them)."""
    tp = config.tensor_parallel_size
    check_tensor_parallel_size(model_config, tp)
    if config.torch_device.type == "cuda" and torch.cuda.device_count() < tp:
        raise ValueError(
            f"tensor_parallel_size={tp} needs {tp} GPUs, {torch.cuda.device_count()} visible"
        )
    ps.set_safe_nccl_env()
    args = (config, model_config, model_dir, spec, max_model_len, key_means)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == tp:
        return _join_torchrun(args, tp)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_main, args=(r, tp, init_method, args), daemon=True)
        for r in range(1, tp)
    ]
    for p in procs:
        p.start()
    shutdown_started = threading.Event()
    for r, p in enumerate(procs, start=1):
        threading.Thread(target=_watch, args=(r, p, shutdown_started), daemon=True).start()
    ps.init_tensor_parallel(0, tp, init_method, _rank_config(config, 0).torch_device)
    runner = TPModelRunner(_rank_config(config, 0), *args[1:])
    _attach_shutdown(runner, procs).started = shutdown_started
    return runner


def _watch(rank: int, proc, shutdown_started: threading.Event) -> None:
    """A worker that dies leaves rank 0 blocked in a collective until the group's timeout:
    end the process at once instead, saying which rank died."""
    proc.join()
    if proc.exitcode != 0 and not shutdown_started.is_set():
        print(
            f"sawkv: tensor-parallel worker rank {rank} died (exit code {proc.exitcode}); "
            "stopping rank 0",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def _join_torchrun(args: tuple, tp: int) -> TPModelRunner:
    rank = int(os.environ["RANK"])
    config = _rank_config(args[0], rank)
    ps.init_tensor_parallel(rank, tp, "env://", config.torch_device)
    runner = TPModelRunner(config, *args[1:])
    if rank == 0:
        _attach_shutdown(runner, [])
        return runner
    try:
        worker_loop(runner)
    finally:
        ps.destroy_tensor_parallel()
    sys.exit(0)
