"""End-to-end search of a ``saw-int4`` recipe: layer formats chosen by the KL to full precision.

:func:`sawkv.eval.calibrate_recipe.calibrate_recipe` measures, per layer, the local
attention-output error of every candidate INT4 format; a local error does not say how much a
layer matters to the next-token distribution, so the search below decides by the mean
per-token KL divergence of the model's next-token distribution to full precision
(:class:`KLScorer`, on short calibration windows):

1. **start**: the best of a few uniform recipes (every layer the same INT4 format,
   :func:`uniform_candidates`) and the per-layer lowest-local-error recipe;
2. **coordinate descent**: layer by layer, its few INT4 formats with the lowest local error;
   a change is kept only if the KL drops by more than its noise (``min_z`` standard errors);
3. **INT8**: the layers whose INT8 (same transform) lowers the KL most, within the budget;
   a layer is promoted only if its KL drops.

Each step keeps a change only when the KL on the calibration windows drops, so the recipe
never scores worse there than the best uniform INT4 method it starts from.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from sawkv.hf.cache import attention_shape, cache_kwargs
from sawkv.quant.methods import KVMethod, parse_method

Progress = Callable[[str, int, int], None]  # (stage, done, total)
Layers = list[KVMethod]


class KLScorer:
    """Mean per-token ``KL(full precision || layers)`` of next-token distributions.

    Args:
        model: the causal LM.
        windows: ``[num_windows, seq_len]`` token ids (equal lengths: one batched forward).
        k_means: ``[num_layers, num_kv_heads, head_dim]`` key means of ``-kc`` layers.
        k_scale: ``[num_layers, num_kv_heads, head_dim]`` key smoothing (keys are quantized
            as ``k / k_scale``, and ``k_means`` are their means), or None.

    The reference log-probabilities are computed once (``[num_windows, seq_len, vocab]``
    fp32: 1 GB at Gemma's 262K vocabulary and 4 x 257 tokens); each call is one forward.
    """

    def __init__(
        self, model, windows: torch.Tensor, k_means: torch.Tensor | None,
        k_scale: torch.Tensor | None = None,
    ):  # fmt: skip
        self.model, self.k_means, self.k_scale = model, k_means, k_scale
        self.device = next(model.parameters()).device
        self.ids = windows.to(self.device)
        self.num_layers = attention_shape(model.config)[0]
        self.num_calls = 0
        plain = Cache(layers=[DynamicLayer() for _ in range(self.num_layers)])
        with torch.no_grad():
            logits = model(self.ids, **cache_kwargs(model, plain), use_cache=True).logits
        self.ref = F.log_softmax(logits.float(), -1)

    @torch.no_grad()
    def per_token(self, layers: Layers, num_sink: int = 0) -> torch.Tensor:
        """``[num_windows, seq_len]`` per-token KL of ``layers`` (``layers[i]``: layer i),
        with each window's first ``num_sink`` tokens exact."""
        from sawkv.eval.calibrate_recipe import fake_quant_cache

        cache = fake_quant_cache(list(layers), self.k_means, num_sink, self.k_scale)
        logits = self.model(self.ids, **cache_kwargs(self.model, cache), use_cache=True).logits
        self.num_calls += 1
        # one window at a time: [seq_len, vocab] temporaries
        return torch.stack([(ref.exp() * (ref - F.log_softmax(out.float(), -1))).sum(-1)
                            for ref, out in zip(self.ref, logits)]).cpu()  # fmt: skip

    def __call__(self, layers: Layers, num_sink: int = 0) -> float:
        return float(self.per_token(layers, num_sink).double().mean())

    def smoothed(self, k_means: torch.Tensor | None, k_scale: torch.Tensor | None) -> KLScorer:
        """The same scorer, sharing its reference logits, with other key means and smoothing."""
        other = copy.copy(self)
        other.k_means, other.k_scale = k_means, k_scale
        return other


def block_se(diff: torch.Tensor, block_len: int = 32) -> float:
    """Standard error of ``diff.mean()`` for ``diff [num_windows, seq_len]``, from the means of
    blocks of ``block_len`` consecutive tokens (neighbouring tokens' KLs are correlated, so a
    per-token SE would be too small)."""
    n = diff.shape[1] // block_len * block_len
    if n == 0:
        return 0.0
    blocks = diff[:, :n].double().reshape(-1, block_len).mean(1)
    if blocks.numel() < 2:
        return 0.0
    return float(blocks.std() / blocks.numel() ** 0.5)


def uniform_candidates(head_dim: int, errors: list[dict[str, float]], num_top: int = 2) -> Layers:
    """INT4 formats tried as uniform recipes: ``int4-bdr{b}-kv-kc`` for every Hadamard block
    b >= 32 dividing head_dim (the previous default is ``int4-bdr64-kv-kc``), K-only
    ``int4-bdr{head_dim}-kc``, and the ``num_top`` formats with the lowest mean log local
    error over layers (``errors[layer][name]``)."""
    names = []
    b = 32
    while b <= head_dim:
        if head_dim % b == 0:
            names.append(f"int4-bdr{b}-kv-kc")
        b *= 2
    names.append(f"int4-bdr{head_dim}-kc")
    log_err = {n: sum(math.log(max(e[n], 1e-30)) for e in errors) for n in errors[0]}
    names += sorted(log_err, key=lambda n: (log_err[n], n))[:num_top]
    out: Layers = []
    for n in names:
        m = parse_method(n, head_dim)
        if m.name in errors[0] and m not in out:
            out.append(m)
    return out


def best_start(score: KLScorer, starts: dict[str, Layers]) -> tuple[str, Layers, dict]:
    """The start recipe with the lowest KL: ``(name, layers, {name: KL})``."""
    kls = {name: score(layers) for name, layers in starts.items()}
    name = min(kls, key=lambda n: (kls[n], n))
    return name, list(starts[name]), kls


def local_ranking(errors: dict[str, float], candidates: Layers, k: int) -> Layers:
    """The ``k`` candidates with the lowest local error (``errors[name]``)."""
    return sorted(candidates, key=lambda m: (errors[m.name], m.name))[:k]


def coordinate_descent(
    score: KLScorer,
    layers: Layers,
    errors: list[dict[str, float]],
    candidates: Layers,
    num_alternatives: int = 2,
    num_passes: int = 1,
    min_z: float = 2.0,
    progress: Progress | None = None,
) -> tuple[Layers, float, list[dict]]:
    """Greedy passes over layers: try each layer's ``num_alternatives`` lowest-local-error
    formats, keep the one that lowers the KL most, if its drop exceeds ``min_z`` standard
    errors of the paired per-token difference (:func:`block_se`).

    A single layer moves the KL by a few percent, as much as the choice of calibration tokens
    does: without the ``min_z`` test the descent fits the noise of its windows (measured on
    SmolLM2 with one chunk per text: KL 0.0254 vs 0.0351 for uniform ``int4-bdr64-kv-kc`` on
    its windows, 0.0366 vs 0.0345 on held-out calibration windows).

    Returns ``(layers, kl, changes)``, each change ``{layer, from, to, kl, z}``.
    """
    layers, changes = list(layers), []
    cur = score.per_token(layers)
    total = num_passes * len(layers)
    for p in range(num_passes):
        num_changes = len(changes)
        for i in range(len(layers)):
            best = None
            for m in local_ranking(errors[i], candidates, num_alternatives):
                if m == layers[i]:
                    continue
                trial = score.per_token(layers[:i] + [m] + layers[i + 1 :])
                diff = cur - trial
                drop = float(diff.double().mean())
                z = drop / max(block_se(diff), 1e-30)
                if drop > 0 and z > min_z and (best is None or drop > best[2]):
                    best = (m, trial, drop, z)
            if best is not None:
                kl = float(best[1].double().mean())
                changes.append({"layer": i, "from": layers[i].name, "to": best[0].name,
                                "kl": kl, "z": best[3]})  # fmt: skip
                layers[i], cur = best[0], best[1]
            if progress is not None:
                progress("descent", p * len(layers) + i + 1, total)
        if len(changes) == num_changes:
            break
    return layers, float(cur.double().mean()), changes


def smoothing_masks(
    mu: torch.Tensor, k_scale: torch.Tensor | None, on: list[bool]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(k_means, k_scale)`` a cache uses when layer ``i`` is smoothed iff ``on[i]``:
    ``mu`` ``[L, H, d]`` are model-space key means, ``k_scale`` the smoothing of every layer;
    layers left off get scale 1 (and None when no layer is on)."""
    if k_scale is None or not any(on):
        return mu, None
    scale = torch.stack([k_scale[i] if on[i] else torch.ones_like(k_scale[i])
                         for i in range(len(on))])  # fmt: skip
    return mu / scale, scale


def smoothing_descent(
    score: KLScorer,
    layers: Layers,
    mu: torch.Tensor,
    k_scale: torch.Tensor,
    on: list[bool],
    min_z: float = 2.0,
    progress: Progress | None = None,
) -> tuple[list[bool], float, list[dict]]:
    """One pass over layers flipping key smoothing on or off (formats fixed), a flip kept if
    its KL drop exceeds ``min_z`` standard errors (as :func:`coordinate_descent`).

    Returns ``(on, kl, flips)``, each flip ``{layer, smooth, kl, z}``.
    """
    on, flips = list(on), []
    cur = score.smoothed(*smoothing_masks(mu, k_scale, on)).per_token(layers)
    for i in range(len(layers)):
        trial_on = on[:i] + [not on[i]] + on[i + 1 :]
        trial = score.smoothed(*smoothing_masks(mu, k_scale, trial_on)).per_token(layers)
        diff = cur - trial
        drop = float(diff.double().mean())
        z = drop / max(block_se(diff), 1e-30)
        if drop > 0 and z > min_z:
            on, cur = trial_on, trial
            flips.append({"layer": i, "smooth": on[i], "kl": float(cur.double().mean()), "z": z})
        if progress is not None:
            progress("smoothing", i + 1, len(layers))
    return on, float(cur.double().mean()), flips


def promote_high(
    score: KLScorer,
    layers: Layers,
    kl: float,
    probed: list[int],
    num_high: int,
    high_bits: int = 8,
    progress: Progress | None = None,
) -> tuple[Layers, float, dict[int, float], list[int]]:
    """Raise to ``high_bits`` (same transform) the ``num_high`` probed layers whose single
    promotion lowers the KL most; only layers with a positive drop are promoted.

    Returns ``(layers, kl, {layer: KL drop}, promoted layers)``.
    """
    drops: dict[int, float] = {}
    single: dict[int, float] = {}
    for j, i in enumerate(probed):
        single[i] = score(layers[:i] + [replace(layers[i], bits=high_bits)] + layers[i + 1 :])
        drops[i] = kl - single[i]
        if progress is not None:
            progress("int8", j + 1, len(probed))
    order = [i for i in sorted(probed, key=lambda i: (-drops[i], i)) if drops[i] > 0]
    promoted = sorted(order[:num_high])
    if not promoted:
        return list(layers), kl, drops, []
    out = [replace(m, bits=high_bits) if i in promoted else m for i, m in enumerate(layers)]
    joint = single[promoted[0]] if len(promoted) == 1 else score(out)
    # layers interact: the recipe is never worse than the best single promotion
    if len(promoted) > 1 and joint > single[order[0]]:
        promoted = [order[0]]
        out = [replace(m, bits=high_bits) if i == order[0] else m for i, m in enumerate(layers)]
        joint = single[order[0]]
    return out, joint, drops, promoted
