"""Attention sinks: each sequence's first few positions kept exact beside the quantized pages.

The first tokens of a sequence draw a large share of attention in most models, so their
quantization error weighs more than any other token's. A layer with sinks keeps the K/V of
positions ``0 .. num_sink - 1`` twice: quantized in the pages as usual (the page layout does not
change) and exact, in the model dtype, in a small side store. Attention reads the exact copy:

- decode kernels attend from position ``num_sink`` on and return the log-sum-exp of their
  scores; :func:`merge_sinks` adds the sinks' exact terms and renormalizes (the split-K merge,
  with the sinks as one more split);
- the SDPA extend path dequantizes the pages into rows anyway and overwrites the sinks' rows
  with exact ones (centered and rotated as the pages store them) before FlashAttention.

Scores are consistent across the two parts because both use centered keys: the kernels score
``q . (k - mu)`` (the pages hold ``R (k - mu)`` and softmax drops the shared ``q . mu``), and so
does :func:`merge_sinks`. The torch reference implements the same contract independently: it
overwrites the dequantized rows of positions below ``num_sink`` with the exact ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sawkv.kernels.page_format import PageFormat


@dataclass
class SinkKV:
    """Exact K/V of each sequence's first ``num_sink`` positions, in model space.

    ``k, v [num_seqs, num_sink, num_kv_heads, head_dim]`` in the model dtype (not centered, not
    rotated; rows at positions >= a sequence's length are ignored, whatever they hold);
    ``k_mean [num_kv_heads, head_dim]`` fp32, the key mean the layer's pages subtract, or None.
    """

    k: torch.Tensor
    v: torch.Tensor
    k_mean: torch.Tensor | None = None

    @property
    def num_sink(self) -> int:
        return self.k.shape[1]

    def check(self, num_seqs: int, fmt: PageFormat) -> None:
        """ValueError naming the mismatch if these sinks do not fit a step of ``num_seqs``."""
        want = (num_seqs, self.num_sink, fmt.num_kv_heads, fmt.head_dim)
        for name, t in (("k", self.k), ("v", self.v)):
            if tuple(t.shape) != want:
                raise ValueError(f"sink {name} has shape {tuple(t.shape)}, expected {want}")
        if not 0 < self.num_sink <= fmt.block_size:
            raise ValueError(f"num_sink must be in 1..block_size, got {self.num_sink}")


def _valid(seq_lens: torch.Tensor, num_sink: int, sliding_window: int) -> torch.Tensor:
    """``[S, n]`` bool: sink j exists (j < len) and is inside the window of the last query."""
    pos = torch.arange(num_sink, device=seq_lens.device)
    lens = seq_lens.long()[:, None]
    ok = pos < lens
    if sliding_window > 0:
        ok &= pos >= lens - sliding_window
    return ok


def merge_sinks(
    q: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    sinks: SinkKV,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add exact sink terms to a decode output computed without them.

    Args:
        q: ``[S, Hq, d]`` the decode queries (model space).
        o: ``[S, Hq, d]`` attention output over positions ``num_sink .. seq_len - 1`` (q dtype
            or fp32); ``lse [S, Hq]`` fp32 natural log-sum-exp of its scaled scores (-inf where
            it attended nothing).
        sinks: the sequences' exact sink K/V. seq_lens: ``[S]`` int32.
        scale, sliding_window: as in the decode kernels.
        out: optional ``[S, Hq, d]`` destination (may be ``o`` itself).
    Returns:
        ``[S, Hq, d]`` in q's dtype: softmax over sinks and the rest together.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, n = sinks.k.shape[2], sinks.num_sink
    g = num_q_heads // num_kv_heads
    ok = _valid(seq_lens, n, sliding_window)[:, None, None, :]  # [S, 1, 1, n]
    k = sinks.k.float()
    if sinks.k_mean is not None:
        k = k - sinks.k_mean.float()
    qg = q.float().view(num_seqs, num_kv_heads, g, head_dim)
    s = torch.einsum("shgd,snhd->shgn", qg, k) * scale
    s = s.masked_fill(~ok, float("-inf"))
    main = lse.float().view(num_seqs, num_kv_heads, g, 1)
    m = torch.maximum(s.amax(-1, keepdim=True), main)
    m = torch.where(torch.isinf(m), 0.0, m)  # nothing attended at all: weights stay 0
    w_main = torch.exp(main - m)
    p = torch.exp(s - m)
    v = torch.where(ok[:, 0, 0, :, None, None], sinks.v.float(), 0.0)  # [S, n, H, d]
    num = w_main * o.float().view(num_seqs, num_kv_heads, g, head_dim)
    num = num + torch.einsum("shgn,snhd->shgd", p, v)
    den = w_main + p.sum(-1, keepdim=True)
    res = torch.where(den > 0, num / den.clamp_min(1e-30), 0.0).view(q.shape)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out
