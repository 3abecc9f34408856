"""The per-rank model runner and the worker loop: tensor parallelism as a method call.

Every rank runs the same :class:`TPModelRunner` (its shard of the weights and of the KV heads;
the same page count, the same page ids, the same device block table). Only rank 0 owns a
scheduler, a block manager, a step planner and a sampler. Each step rank 0 plans one
:class:`StepInputs` and calls ``runner.call("execute", inputs)``: it broadcasts
``("execute", (inputs,))`` over the host (gloo) group and every worker calls the same method on
its own runner; collectives inside the model keep them in lockstep, and the logits are
gathered on rank 0.

    rank 0:  schedule -> plan -> call("execute", inputs) --broadcast--> execute -> logits -> sample
    rank r:                       loop: (method, args) <-------------- execute -> (gather)
"""

from __future__ import annotations

import dataclasses
import time

import torch

from sawkv.cache.kv_cache import KVCacheSpec
from sawkv.config import EngineConfig, ModelConfig
from sawkv.distributed.layers import local_model_config, parallelize
from sawkv.distributed.loader import load_sharded_safetensors
from sawkv.distributed.parallel_state import (
    broadcast_object,
    min_over_ranks,
    tp_rank,
    tp_size,
)
from sawkv.engine.model_runner import ModelRunner
from sawkv.models.loader import MODEL_CLASSES, _default_dtype, init_dummy


def local_spec(spec: KVCacheSpec, tp: int) -> KVCacheSpec:
    """The pages one rank allocates: its own ``num_kv_heads / tp`` heads (every layer keeps
    its format)."""
    return dataclasses.replace(spec, num_kv_heads=spec.num_kv_heads // tp)


class TPModelRunner(ModelRunner):
    """:class:`ModelRunner` over this rank's shard. Takes the *full* config, spec and key means
    and keeps this rank's part of each."""

    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        model_dir,
        spec: KVCacheSpec,
        max_model_len: int,
        key_means: torch.Tensor | None,
    ) -> None:
        self.rank, self.tp = tp_rank(), tp_size()
        self.full_model_config = model_config
        heads = model_config.num_kv_heads // self.tp
        if key_means is not None:  # [layers, kv_heads, d] -> this rank's heads
            key_means = key_means[:, self.rank * heads : (self.rank + 1) * heads].contiguous()
        super().__init__(
            config,
            local_model_config(model_config, self.tp),
            model_dir,
            local_spec(spec, self.tp),
            max_model_len,
            key_means,
        )

    def _local_kv_heads(self, t: torch.Tensor) -> torch.Tensor:
        heads = self.full_model_config.num_kv_heads // self.tp
        return t[:, self.rank * heads : (self.rank + 1) * heads].contiguous()

    def _build_model(self, model_config: ModelConfig, model_dir):
        with _default_dtype(self.dtype), torch.device(self.device):
            model = MODEL_CLASSES[model_config.architecture](
                model_config, self.backend, self.max_model_len
            )
        parallelize(model, self.full_model_config, self.rank, self.tp)
        if model_dir is None:
            init_dummy(model, self.config.seed)
        else:
            load_sharded_safetensors(model, model_dir, self.full_model_config, self.rank, self.tp)
        return model.eval().requires_grad_(False)

    def _decide_num_blocks(self) -> int:
        # one block manager (rank 0) hands out page ids valid on every rank, and first pages
        # (attention sinks' rows) from a range every rank's sink stores cover
        blocks = min_over_ranks(super()._decide_num_blocks())
        self.num_first_blocks = min_over_ranks(self.num_first_blocks)  # every rank calls it
        return blocks

    @property
    def tensor_parallel_size(self) -> int:
        return self.tp

    def call(self, method: str, *args):
        """Rank 0: broadcast ``(method, args)`` so every worker runs the same method on its
        shard (their collectives need ours), then run it here."""
        if self.rank == 0:
            broadcast_object((method, args))
        return getattr(self, method)(*args)

    def time_all_reduce(self, num_tokens: int, iters: int = 50) -> float:
        """Seconds per all-reduce of a ``[num_tokens, hidden]`` activation in the model dtype
        (every rank runs it: call it through :meth:`call`)."""
        from sawkv.distributed.parallel_state import all_reduce

        x = torch.ones(num_tokens, self.model_config.hidden_size, dtype=self.dtype,
                       device=self.device)  # fmt: skip
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda *a: None)
        for _ in range(5):
            all_reduce(x)
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            all_reduce(x)
        sync()
        return (time.perf_counter() - t) / iters

    def shutdown(self) -> None:
        """Rank 0: stop the workers and leave the group (idempotent)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()


# ---- the worker loop ------------------------------------------------------------------------
def worker_loop(runner: TPModelRunner) -> None:
    """Ranks > 0: run the method rank 0 broadcasts, with its arguments, until ``exit``."""
    while True:
        method, args = broadcast_object()
        if method == "exit":
            return
        getattr(runner, method)(*args)
