"""Sampler: top-k / top-p masks against a plain per-row reference, seeds, greedy."""

from __future__ import annotations

import pytest
import torch

from sawkv.engine.sampler import Sampler, apply_top_k_top_p
from sawkv.engine.sampling_params import SamplingParams


def reference_keep(row: torch.Tensor, k: int, p: float) -> set[int]:
    """Tokens kept: the k best, then the smallest best-first prefix whose mass reaches p."""
    order = sorted(range(len(row)), key=lambda i: -float(row[i]))
    if 0 < k < len(row):
        order = order[:k]
    probs = torch.softmax(row[order].double(), 0).tolist()
    keep, mass = [], 0.0
    for i, pr in zip(order, probs):
        keep.append(i)
        mass += pr
        if p < 1.0 and mass >= p:
            break
    return set(keep)


@pytest.mark.parametrize("k,p", [(-1, 1.0), (5, 1.0), (-1, 0.7), (8, 0.5), (1, 0.9), (50, 0.95)])
def test_masks_match_reference(k, p):
    g = torch.Generator().manual_seed(k * 100 + int(p * 10))
    logits = torch.randn(6, 40, generator=g) * 3
    out = apply_top_k_top_p(logits, torch.full((6,), k), torch.full((6,), p))
    for r in range(6):
        kept = set(torch.nonzero(torch.isfinite(out[r])).flatten().tolist())
        assert kept == reference_keep(logits[r], k, p)
        assert torch.equal(out[r][list(kept)], logits[r][list(kept)])


def test_per_row_parameters():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    out = apply_top_k_top_p(logits, torch.tensor([3, -1]), torch.tensor([1.0, 0.3]))
    assert torch.isfinite(out[0]).sum() == 3
    assert set(torch.nonzero(torch.isfinite(out[1])).flatten().tolist()) == reference_keep(
        logits[1], -1, 0.3
    )


def test_greedy_and_top_k_one_are_argmax():
    s = Sampler(torch.device("cpu"), 0)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_k=1)] * 2
    assert s(logits, params, [None] * 4) == logits.argmax(-1).tolist()


def test_seed_reproducible_independent_of_batch():
    s = Sampler(torch.device("cpu"), 0)
    logits = torch.zeros(3, 1000)  # uniform: every draw is pure generator output
    p = SamplingParams(temperature=1.0, seed=7)
    runs = []
    for others in (0, 2):
        gen = s.new_generator(7)
        draws = []
        for _ in range(5):
            rows = [p] + [SamplingParams(temperature=1.0)] * others
            gens = [gen] + [None] * others
            draws.append(s(logits[: 1 + others], rows, gens)[0])
        runs.append(draws)
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1  # really sampling


def test_sampling_follows_distribution():
    s = Sampler(torch.device("cpu"), 3)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 1e-9]]))
    counts = torch.zeros(4)
    for _ in range(2000):
        counts[s(logits, [SamplingParams(temperature=1.0)], [None])[0]] += 1
    assert torch.allclose(counts / 2000, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.04)
