"""Tensor-parallel model pieces, Megatron style.

The model is built from the *local* :class:`ModelConfig` (:func:`local_model_config`): each
rank holds ``num_heads / tp`` query heads, ``num_kv_heads / tp`` KV heads,
``intermediate_size / tp`` MLP columns and ``ceil(vocab / tp)`` vocabulary rows. With those
shapes the existing modules already are the column-parallel ones (fused q|k|v and gate|up
produce this rank's heads / columns) and the row-parallel ones (o_proj, down_proj take this
rank's slice of the input dim); :func:`parallelize` then adds the collectives by switching
classes in place (no copy of the weights):

- o_proj / down_proj -> :class:`RowParallelLinear`: partial sums, then all-reduce;
- embed_tokens -> :class:`VocabParallelEmbedding`: rows of this rank's vocabulary range,
  zeros elsewhere, then all-reduce (exact: one non-zero term per element);
- the model -> :class:`TensorParallelLogits` mixin: logits of the local vocabulary shard,
  gathered on rank 0.

Head counts that tp does not divide are rejected (:func:`check_tensor_parallel_size`) rather
than padded or replicated: e.g. SmolLM2-135M (9 query / 3 KV heads) serves at tp=1 or 3 only.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from sawkv.config import ModelConfig
from sawkv.distributed.parallel_state import all_reduce, gather_last_dim


def valid_tensor_parallel_sizes(cfg: ModelConfig) -> list[int]:
    """Sizes that split query heads, KV heads and MLP columns evenly."""
    return [
        t
        for t in range(1, cfg.num_kv_heads + 1)
        if cfg.num_heads % t == 0 and cfg.num_kv_heads % t == 0 and cfg.intermediate_size % t == 0
    ]


def check_tensor_parallel_size(cfg: ModelConfig, tp: int) -> None:
    """ValueError unless ``tp`` divides the query heads, KV heads and intermediate size."""
    valid = valid_tensor_parallel_sizes(cfg)
    if tp not in valid:
        raise ValueError(
            f"tensor_parallel_size={tp} does not split this model evenly: it has "
            f"{cfg.num_heads} query heads, {cfg.num_kv_heads} KV heads and intermediate size "
            f"{cfg.intermediate_size}; each rank must hold whole heads (uneven or replicated "
            f"KV heads are not supported). Valid sizes: {valid}"
        )


def vocab_shard(vocab: int, rank: int, tp: int) -> tuple[int, int, int]:
    """(start, end, padded size per rank) of ``rank``'s vocabulary rows; the last shard is
    zero-padded to the common size so the gathered logits concatenate."""
    per = -(-vocab // tp)
    start = min(rank * per, vocab)
    return start, min(start + per, vocab), per


def local_model_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The shapes one rank builds (heads, MLP columns and vocabulary divided by ``tp``)."""
    check_tensor_parallel_size(cfg, tp)
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // tp,
        num_kv_heads=cfg.num_kv_heads // tp,
        intermediate_size=cfg.intermediate_size // tp,
        vocab_size=vocab_shard(cfg.vocab_size, 0, tp)[2],
    )


class RowParallelLinear(nn.Linear):
    """``x [T, in / tp] -> [T, out]``: this rank's partial product, summed over ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Embedding of ids in ``[vocab_start, vocab_end)`` from local rows; other ids give zeros
    here and their row on the rank that owns them; the all-reduce assembles every row."""

    vocab_start: int = 0
    vocab_end: int = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(x.masked_fill(outside.unsqueeze(-1), 0.0))


class TensorParallelLogits:
    """Mixin over a ``CausalLM``: local-vocabulary logits gathered to ``[n, vocab]`` on rank 0."""

    full_vocab_size: int = 0

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return gather_last_dim(super().compute_logits(hidden), self.full_vocab_size)


_TP_CLASSES: dict[type, type] = {}


def parallelize(model: nn.Module, full: ModelConfig, rank: int, tp: int) -> nn.Module:
    """Add the collectives to a model built from ``local_model_config(full, tp)`` (in place)."""
    for layer in model.layers:
        layer.self_attn.o_proj.__class__ = RowParallelLinear
        layer.mlp.down_proj.__class__ = RowParallelLinear
    emb = model.embed_tokens
    emb.__class__ = VocabParallelEmbedding
    emb.vocab_start, emb.vocab_end, _ = vocab_shard(full.vocab_size, rank, tp)
    base = type(model)
    if base not in _TP_CLASSES:
        _TP_CLASSES[base] = type(f"TensorParallel{base.__name__}", (TensorParallelLogits, base), {})
    model.__class__ = _TP_CLASSES[base]
    model.full_vocab_size = full.vocab_size
    return model
