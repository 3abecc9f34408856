"""Sharded safetensors loading: each rank reads every tensor and keeps its slice.

Slicing rules (HF names, after :func:`sawkv.models.loader._map_name`):
q/k/v, gate/up (weights and biases) -> rows ``[rank * n/tp, (rank+1) * n/tp)`` (whole heads,
so GQA groups stay on one rank); o_proj, down_proj -> the same split of columns;
embed_tokens, lm_head -> this rank's vocabulary rows (zero-padded); everything else (norms,
QK-norm weights) is replicated.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sawkv.config import ModelConfig
from sawkv.distributed.layers import vocab_shard
from sawkv.models.loader import load_safetensors

_ROW_PARALLEL = ("o_proj.weight", "down_proj.weight")
_VOCAB = ("embed_tokens.weight", "lm_head.weight")


def shard_tensor(
    name: str, shard: int | None, t: torch.Tensor, full: ModelConfig, rank: int, tp: int
) -> torch.Tensor:
    """This rank's part of checkpoint tensor ``t`` mapped to parameter ``name``."""
    if shard is not None:  # column-parallel: a q/k/v or gate/up block of output rows
        return t.chunk(tp, dim=0)[rank]
    if name.endswith(_ROW_PARALLEL):
        return t.chunk(tp, dim=1)[rank]
    if name.endswith(_VOCAB):
        start, end, per = vocab_shard(full.vocab_size, rank, tp)
        out = t.new_zeros(per, t.shape[1])
        out[: end - start] = t[start:end]
        return out
    return t


def load_sharded_safetensors(
    model: nn.Module, model_dir: Path, full: ModelConfig, rank: int, tp: int
) -> None:
    """Fill a tensor-parallel ``model`` with its slices of ``model_dir/*.safetensors``."""
    load_safetensors(
        model, model_dir, lambda name, shard, t: shard_tensor(name, shard, t, full, rank, tp)
    )
