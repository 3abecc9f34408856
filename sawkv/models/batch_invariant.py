"""Batch-invariant linear layers: a token's output does not depend on what else is in the batch.

Why: CPU GEMM libraries pick their kernel and blocking from the matrix shape, so the same token
row multiplied by the same weight rounds differently as a lone row (a GEMV), as one of 8 rows or
as one of 2048. On an unquantized cache that noise (~1e-5 in the logits of SmolLM2) rarely flips
a greedy token, but an INT8/INT4 cache turns it into whole code steps whenever a value sits near
a rounding boundary, and greedy output then depends on the batch (measured on SmolLM2-135M, 8
prompts x 32 tokens, alone vs together: int8 6 of 8 identical, int4-bdr64-kv-kc 3 of 8).

How: every linear runs as a batched GEMM over fixed tiles of :data:`TILE_ROWS` rows (zero
padded), so the library sees the same ``[TILE_ROWS, in] x [in, out]`` problem whatever the step
holds. Measured on torch 2.11-2.13 CPU builds: a row's result is bit-identical at every position
of a tile and for any number of tiles (``tests/models/test_batch_invariant.py`` checks it). One
``bmm`` with a stride-0 weight costs ~1.1x a plain linear for decode-sized batches and ~1.5x for
long prefills; a Python loop over tiles would cost 10x.

The rest of the CPU step is already invariant: norms, RoPE and activations work row by row, and
the torch attention reference computes each sequence over its own pages.
"""

from __future__ import annotations

import torch

TILE_ROWS = 16  # rows per GEMM tile: small enough that a lone decode row costs ~1.1x a GEMV


def batch_invariant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` whose every output row depends only on its input row.

    Args:
        x: ``[..., in_features]``.
        weight: ``[out_features, in_features]``; bias: ``[out_features]`` or None.
    Returns:
        ``[..., out_features]`` in ``x``'s dtype; row r equals the result for row r alone.
    """
    lead, in_features = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, in_features)
    num_rows = rows.shape[0]
    pad = -num_rows % TILE_ROWS
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, in_features)])
    tiles = rows.view(-1, TILE_ROWS, in_features)
    # stride-0 batch of the transposed weight: one GEMM call per tile shape, no copy
    w_t = weight.t().expand(tiles.shape[0], *weight.t().shape)
    out = torch.bmm(tiles, w_t).view(-1, weight.shape[0])[:num_rows]
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, weight.shape[0])
