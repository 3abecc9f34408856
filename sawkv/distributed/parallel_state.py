"""Process-wide tensor-parallel state: rank, size, groups, and the collectives the model uses.

Two groups, as vLLM does: the default (world) group carries tensors between devices (NCCL on
GPU, gloo on CPU) and a gloo group carries the host-side step plan rank 0 broadcasts, so
control messages never touch the GPU stream. With size 1 every collective is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# NVLink multicast (NVLS) can take a shared host's GPUs out of service: keep it off everywhere,
# also in processes we spawn (they inherit os.environ).
NCCL_SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@dataclass
class _TPState:
    rank: int
    size: int
    cpu_group: object


_STATE: _TPState | None = None


def set_safe_nccl_env() -> None:
    for key, value in NCCL_SAFE_ENV.items():
        os.environ[key] = value


def init_tensor_parallel(
    rank: int, size: int, init_method: str, device: torch.device, timeout_s: float | None = None
) -> None:
    """Join the ``size``-rank group (``init_method``: ``tcp://host:port`` or ``env://``).
    Collectives time out after ``timeout_s`` (default ``$SAWKV_TP_TIMEOUT_S`` or 600)."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("SAWKV_TP_TIMEOUT_S", "600"))
    global _STATE
    if _STATE is not None:
        raise RuntimeError("tensor parallelism is already initialised in this process")
    set_safe_nccl_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=init_method,
        world_size=size,
        rank=rank,
        timeout=timedelta(seconds=timeout_s),
    )
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    _STATE = _TPState(rank, size, cpu_group)
    # create the device communicator now, outside any CUDA graph capture
    warm = torch.ones(1, device=device)
    dist.all_reduce(warm)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def destroy_tensor_parallel() -> None:
    """Leave the group; every rank calls it at about the same time.

    NCCL groups are aborted (a local operation) rather than destroyed: a destroy waits for
    the peers' communicators (finalize), and a peer that has already exited, or is waiting
    for this rank, leaves it blocked until the timeout. That was seen on 2 H200s: rank 0
    hung in teardown between two engines of the benchmark."""
    global _STATE
    if _STATE is None:
        return
    _STATE = None
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl" and hasattr(dist.distributed_c10d, "_abort_process_group"):
        torch.cuda.synchronize()
        try:
            dist.distributed_c10d._abort_process_group()
            return
        except (RuntimeError, ValueError):  # fall back to the collective teardown
            pass
    dist.destroy_process_group()


def tp_rank() -> int:
    return 0 if _STATE is None else _STATE.rank


def tp_size() -> int:
    return 1 if _STATE is None else _STATE.size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks in place (row-parallel outputs, embedding shards)."""
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def gather_last_dim(x: torch.Tensor, full: int) -> torch.Tensor:
    """``x [n, full_padded / size]`` on every rank -> ``[n, full]`` on rank 0 (others get their
    own shard back, to be ignored). Used for vocabulary-parallel logits."""
    if tp_size() == 1:
        return x
    x = x.contiguous()
    if tp_rank() != 0:
        dist.gather(x, None, dst=0)
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())]
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1)[:, :full]


def broadcast_object(obj=None):
    """Rank 0 sends ``obj`` (picklable) over the host group; every rank returns it."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_STATE.cpu_group)
    return box[0]


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` of all ranks (page counts must agree: one block table for all)."""
    if tp_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_STATE.cpu_group)
    return int(t.item())
