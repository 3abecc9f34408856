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

Formats differ in size once keys may carry per-half metadata (``-kh``: +32 bits per key and
head, so ``+16 / head_dim`` bits per element): every step stays within the budget
(:func:`search_formats`), and the bits ``-kh`` layers take from INT8 layers are weighed by KL
(:func:`spend_on_high`).
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


def recipe_bits(layers: Layers, head_dim: int) -> float:
    """Average bits per element of per-layer formats, metadata included (as
    :meth:`~sawkv.quant.recipe.Recipe.bits_per_element`)."""
    return sum(m.bits_per_element(head_dim) for m in layers) / len(layers)


def fits(layers: Layers, head_dim: int, budget: float | None) -> bool:
    """Whether ``layers`` stay within ``budget`` bits per element (None: no budget)."""
    return budget is None or recipe_bits(layers, head_dim) <= budget + 1e-9


def uniform_candidates(
    head_dim: int, errors: list[dict[str, float]], num_top: int = 2, budget: float | None = None
) -> Layers:
    """INT4 formats tried as uniform recipes: ``int4-bdr{b}-kv-kc`` for every Hadamard block
    b >= 32 dividing head_dim (the previous default is ``int4-bdr64-kv-kc``), K-only
    ``int4-bdr{head_dim}-kc``, their ``-kh`` variants where the candidates (``errors[layer]
    [name]``) have them, and the ``num_top`` formats with the lowest mean log local error over
    layers; only formats within ``budget`` (a uniform ``-kh`` recipe costs ``4 + 48 /
    head_dim``: 4.75 at d=64, within the default budget there)."""
    names = []
    b = 32
    while b <= head_dim:
        if head_dim % b == 0:
            names.append(f"int4-bdr{b}-kv-kc")
        b *= 2
    names.append(f"int4-bdr{head_dim}-kc")
    names += [f"{n}-kh" for n in names]
    affordable = [n for n in errors[0] if fits([parse_method(n, head_dim)], head_dim, budget)]
    log_err = {n: sum(math.log(max(e[n], 1e-30)) for e in errors) for n in affordable}
    names += sorted(log_err, key=lambda n: (log_err[n], n))[:num_top]
    out: Layers = []
    for n in names:
        m = parse_method(n, head_dim)
        if m.name in affordable and m not in out:
            out.append(m)
    return out


def local_start(
    errors: list[dict[str, float]], candidates: Layers, head_dim: int, budget: float | None
) -> Layers:
    """Per layer the candidate of lowest local error; if that recipe is over ``budget``
    (``-kh`` everywhere beyond it), per layer the lowest-error candidate without ``-kh``."""
    layers = [min(candidates, key=lambda m: (e[m.name], m.name)) for e in errors]
    if fits(layers, head_dim, budget):
        return layers
    plain = [m for m in candidates if not m.k_half_meta]
    return [min(plain, key=lambda m: (e[m.name], m.name)) for e in errors]


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
    *,
    budget: float | None = None,
    head_dim: int | None = None,
) -> tuple[Layers, float, list[dict]]:
    """Greedy passes over layers: try each layer's ``num_alternatives`` lowest-local-error
    formats (among those that keep the recipe within ``budget`` bits per element at
    ``head_dim``, given the other layers), keep the one that lowers the KL most, if its drop
    exceeds ``min_z`` standard errors of the paired per-token difference (:func:`block_se`).

    A single layer moves the KL by a few percent, as much as the choice of calibration tokens
    does: without the ``min_z`` test the descent fits the noise of its windows (measured on
    SmolLM2 with one chunk per text: KL 0.0254 vs 0.0351 for uniform ``int4-bdr64-kv-kc`` on
    its windows, 0.0366 vs 0.0345 on held-out calibration windows).

    Returns ``(layers, kl, changes)``, each change ``{layer, from, to, kl, z}``.
    """
    if budget is not None and head_dim is None:
        raise ValueError("coordinate_descent with a budget needs head_dim (bits per element)")
    layers, changes = list(layers), []
    cur = score.per_token(layers)
    total = num_passes * len(layers)
    for p in range(num_passes):
        num_changes = len(changes)
        for i in range(len(layers)):
            best = None
            options = [m for m in candidates
                       if fits(layers[:i] + [m] + layers[i + 1 :], head_dim, budget)]  # fmt: skip
            for m in local_ranking(errors[i], options, num_alternatives):
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


def search_formats(
    score: KLScorer,
    errors: list[dict[str, float]],
    candidates: Layers,
    head_dim: int,
    budget: float | None,
    num_alternatives: int = 2,
    num_passes: int = 1,
    min_z: float = 2.0,
    progress: Progress | None = None,
) -> tuple[str, Layers, dict[str, float], float, list[dict]]:
    """Steps 1 and 2 within ``budget``: the best start (uniform candidates that fit, and the
    local start, :func:`local_start`), then :func:`coordinate_descent` over ``candidates``.

    Args:
        errors: per layer, each candidate's local error (``errors[layer][name]``).
        candidates: the formats a layer may take (e.g. INT4 with and without ``-kh``).
    Returns:
        ``(start name, layers, {start: KL}, KL, changes)``.
    """
    num_layers = len(errors)
    starts = {m.name: [m] * num_layers
              for m in uniform_candidates(head_dim, errors, budget=budget)}  # fmt: skip
    starts["local"] = local_start(errors, candidates, head_dim, budget)
    start, layers, kl_starts = best_start(score, starts)
    if progress is not None:
        progress("start", len(starts), len(starts))
    layers, kl, changes = coordinate_descent(
        score, layers, errors, candidates, num_alternatives, num_passes, min_z, progress,
        budget=budget, head_dim=head_dim,
    )  # fmt: skip
    return start, layers, kl_starts, kl, changes


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


def num_high_layers(num_layers: int, low_bits: float, high_bits: float, budget: float) -> int:
    """Most layers that can take the high format with the average within ``budget``."""
    if budget < low_bits - 1e-9:
        raise ValueError(
            f"budget {budget:.4f} bits per element is below the low format's {low_bits:.4f}"
        )
    n = math.floor(num_layers * (budget - low_bits) / (high_bits - low_bits) + 1e-9)
    return max(0, min(num_layers, n))


def _promote_within(score, layers, kl, errors, head_dim, budget, num_probed, high_bits, progress):
    """:func:`promote_high` with as many high layers as ``layers`` leave of ``budget``, probing
    the ``num_probed`` layers of largest local error (0: all)."""
    low = recipe_bits(layers, head_dim)
    # a promotion adds high_bits - bits to one layer, whatever its metadata
    n_high = num_high_layers(len(layers), low, low + high_bits - layers[0].bits, budget)
    errs = [e[m.name] for e, m in zip(errors, layers)]
    by_err = sorted(range(len(layers)), key=lambda i: (-errs[i], i))
    probed = sorted(by_err[: num_probed or len(layers)]) if n_high else []
    return promote_high(score, layers, kl, probed, n_high, high_bits, progress)


def spend_on_high(
    score: KLScorer,
    layers: Layers,
    kl: float,
    errors: list[dict[str, float]],
    head_dim: int,
    budget: float,
    num_probed: int = 8,
    high_bits: int = 8,
    progress: Progress | None = None,
) -> tuple[Layers, float, dict[int, float], list[int], dict[str, float]]:
    """Step 3: INT8 layers (:func:`promote_high`) with the bits the INT4 ``layers`` leave of
    ``budget``. Where ``-kh`` layers take bits that would buy more INT8 layers, the same
    recipe without ``-kh`` (more INT8 layers) is finished too, and the lower KL wins.

    Args:
        layers: INT4 formats of one bit width (``-kh`` or not), KL ``kl``.
        errors: per layer, each format's local error (names of ``layers`` and of their
            ``-kh``-less variants); the ``num_probed`` layers of largest error are probed.
    Returns:
        ``(layers, kl, {layer: KL drop of its promotion}, promoted layers, {"k_half": KL,
        "int8": KL})``, the last empty when there was nothing to weigh.
    """
    args = (errors, head_dim, budget, num_probed, high_bits, progress)
    out = _promote_within(score, layers, kl, *args)
    plain = [replace(m, k_half_meta=False) for m in layers]
    if plain == list(layers):
        return (*out, {})

    def n_high(ls):
        low = recipe_bits(ls, head_dim)
        return num_high_layers(len(ls), low, low + high_bits - ls[0].bits, budget)

    if n_high(plain) <= n_high(layers):  # -kh costs no INT8 layer
        return (*out, {})
    other = _promote_within(score, plain, score(plain), *args)
    weighed = {"k_half": out[1], "int8": other[1]}
    return (*(other if other[1] < out[1] else out), weighed)


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
