"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Rows with a seed draw from their own ``torch.Generator`` so a request's samples do not depend
on what else is in the batch; other rows share the engine's generator.
"""

from __future__ import annotations

import torch

from sawkv.engine.sampling_params import SamplingParams


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p exclude.

    Args:
        logits: ``[n, vocab]`` fp32 (already divided by temperature).
        top_k: ``[n]`` int64, <= 0 or >= vocab disables.
        top_p: ``[n]`` fp32 in (0, 1]; 1 disables. The smallest set of top tokens whose
            probability reaches top_p is kept (always at least one token).
    Returns:
        New ``[n, vocab]`` tensor.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    ranks = torch.arange(vocab, device=logits.device)
    drop = ranks[None, :] >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the better-ranked tokens
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)  # 1.0: off, despite rounding
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> list[int]:
        """``logits [n, vocab]`` fp32 -> one token id per row (waits for the device)."""
        return self.sample(logits, params, generators).tolist()

    @torch.no_grad()
    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """``logits [n, vocab]`` fp32 -> ``[n]`` int64 token ids on the logits' device, without
        waiting for them (async scheduling feeds them to the next step on the device)."""
        greedy = logits.argmax(-1)
        if all(p.is_greedy for p in params):
            return greedy
        temps = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
        scaled = logits / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            top_k = torch.tensor([p.top_k for p in params], device=logits.device)
            top_p = torch.tensor([p.top_p for p in params], device=logits.device)
            scaled = apply_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(-1)
        out = greedy.clone()
        for i, (p, gen) in enumerate(zip(params, generators)):
            if not p.is_greedy:
                out[i] = torch.multinomial(probs[i], 1, generator=gen or self.generator)[0]
        return out
