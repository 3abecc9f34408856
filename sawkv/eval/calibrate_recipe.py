"""``sawkv calibrate``: build a model's ``saw-int4`` recipe from a sensitivity profile.

The recipe gives every layer one servable page format (see :mod:`sawkv.quant.recipe`). Steps,
all on calibration windows (``split="calib"`` of several texts, so no evaluation token is ever
seen, and no single corpus decides):

1. **Capture** post-RoPE Q, K, V of every layer (one plain forward per window) and the key
   means mu (per layer and KV head, over every token, attention sinks included).
   **Key smoothing** (``smooth_keys``): per channel, keys are stored as ``k / s`` and queries
   read as ``q * s`` (scores unchanged), with ``s`` from the captured query and key energies
   (:func:`~sawkv.quant.recipe.smoothing_scales`). The format search runs smoothed if that
   lowers the KL of a uniform INT4 recipe; after step 3 one pass over layers turns it on or
   off per layer where that lowers the KL beyond its noise. Measured on
   Gemma-3 (fake-quant, its v3 recipe formats, 4 x 1,024 tokens of Austen): +6.8% -> +3.3%
   perplexity; on SmolLM2 +3.85% -> +3.77%.
2. **Local errors** (cheap): for every candidate INT4 format (Hadamard block b in
   {none, 16, ..., head_dim}, K-only or K+V rotation, key centering on/off, and with
   ``k_half_meta`` keys with one (scale, min) per half, ``-kh``) quantize each layer's K and
   V and measure the relative error of its causal attention output ``|o_hat - o|^2 / |o|^2``
   against exact attention with the same queries (64 query positions per window, all keys).
3. **Search by end-to-end KL** (:mod:`sawkv.eval.recipe_search`; the KL of the next-token
   distributions to full precision on short chunks of each text's window): start from
   the best of a few uniform INT4 recipes and the lowest-local-error recipe, then coordinate
   descent over layers (each layer's ``num_alternatives`` lowest-error formats; a change is
   kept only if the KL drops by more than its noise), so the recipe never scores worse on
   calibration windows than the uniform methods tried. ``-kh`` formats cost 16 / head_dim
   more bits per element (a uniform ``-kh`` recipe: 4.75 at d=64, 4.375 at d=128): starts
   and changes are kept within the budget.
4. **INT8 under the budget**: of the ``num_sens_layers`` layers with the largest INT4
   attention-output error, those whose INT8 (same transform) lowers the KL most, while the
   average bits per element (metadata included) stays within the budget; by default 0.25
   above plain per-token INT4 (4.75 at d=64, 4.5 at d=128, 4.375 at d=256), i.e. one layer
   in sixteen without ``-kh``. Where ``-kh`` layers take the bits of INT8 layers, the recipe
   without ``-kh`` is finished with its INT8 layers too, and the lower KL wins.
5. **Attention sinks**: each of ``sink_candidates`` (exact first tokens per sequence, e.g.
   0, 1 or 4) is scored by the same KL with the final layers, and the lowest wins. They cost
   ~0.01 bits per element at 4K tokens, and help or hurt by model: measured on Austen,
   Qwen2.5-Coder-0.5B went from +4.3% to +2.6% perplexity with 4, while 4 hurt Gemma-3
   without its BOS. :func:`choose_num_sink` does this step alone, for a stored recipe.

Group sizes are not candidates (the paged kernels do not serve them; ``-kh``, two groups per key,
they do). K and V share one format per layer because a layer's ``PageFormat`` has one ``bits``
for both.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from sawkv.eval.recipe_search import (
    KLScorer,
    search_formats,
    smoothing_descent,
    smoothing_masks,
    spend_on_high,
)
from sawkv.hf.cache import attention_shape, cache_kwargs
from sawkv.quant.methods import KVMethod
from sawkv.quant.recipe import Recipe, default_budget, plain_int4_bits

CALIB_TEXTS = ("austen", "paulgraham", "wikipedia", "owt")
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class RecipeConfig:
    """Calibration settings of a recipe.

    ``tokens_per_text`` tokens of each of ``texts`` (calibration split) in windows of
    ``window_len`` drive the key means and the per-layer format choice; ``num_sens_windows``
    chunks of ``sens_len`` tokens of the first window of each text drive the end-to-end KL
    (one batched forward per configuration): coordinate descent tries each layer's
    ``num_alternatives`` lowest-error INT4 formats in up to ``num_passes`` passes and keeps a
    change only if its KL drop exceeds ``min_z`` standard errors; the ``num_sens_layers``
    layers with the largest INT4 attention-output error are the INT8 candidates (0: every
    layer). ``budget`` None means :func:`~sawkv.quant.recipe.default_budget`.
    ``smooth_keys`` tries key smoothing (kept only where it lowers the KL). ``k_half_meta``
    adds the ``-kh`` variant of every INT4 format to the candidates (within the budget).
    """

    texts: tuple[str, ...] = CALIB_TEXTS
    tokens_per_text: int = 512
    window_len: int = 512
    sens_len: int = 128
    num_sens_windows: int = 2
    num_queries: int = 64
    num_sens_layers: int = 8
    num_alternatives: int = 2
    num_passes: int = 1
    min_z: float = 2.0
    budget: float | None = None
    min_had_block: int = 16
    high_bits: int = 8
    sink_candidates: tuple[int, ...] = (0, 1, 4)
    smooth_keys: bool = True
    k_half_meta: bool = True
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.texts:
            raise ValueError("calibration needs at least one text")
        if self.window_len < 16 or self.tokens_per_text < self.window_len:
            raise ValueError(
                f"need window_len >= 16 and tokens_per_text >= window_len, got "
                f"{self.window_len}, {self.tokens_per_text}"
            )
        if self.num_sens_layers < 0:
            raise ValueError(f"num_sens_layers must be >= 0, got {self.num_sens_layers}")
        if self.num_alternatives < 1 or self.num_passes < 0 or self.min_z < 0:
            raise ValueError(
                f"need num_alternatives >= 1, num_passes >= 0 and min_z >= 0, got "
                f"{self.num_alternatives}, {self.num_passes}, {self.min_z}"
            )
        if self.num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {self.num_queries}")
        if not 2 <= self.sens_len <= self.window_len:
            raise ValueError(f"sens_len must be in [2, window_len], got {self.sens_len}")
        if not 1 <= self.num_sens_windows <= self.window_len // self.sens_len:
            raise ValueError(
                f"num_sens_windows must be in [1, window_len // sens_len], got "
                f"{self.num_sens_windows}"
            )
        if self.budget is not None and not 4 <= self.budget <= 16:
            raise ValueError(f"budget must be in [4, 16] bits per element, got {self.budget}")
        if self.high_bits not in (8,):
            raise ValueError(f"high_bits must be 8 (what the kernels serve), got {self.high_bits}")


def candidate_formats(
    head_dim: int, bits: int, min_had_block: int = 16, k_half: bool = False
) -> list[KVMethod]:
    """Every servable token-wise format of ``bits``: Hadamard block none or a power of two in
    [min_had_block, head_dim], K-only or K+V rotation, key centering on or off, and with
    ``k_half`` keys with one (scale, min) per half or per key (``-kh`` or not)."""
    blocks: list[int | None] = [None]
    b = min_had_block
    while b <= head_dim:
        if head_dim % b == 0:
            blocks.append(b)
        b *= 2
    out = []
    for hb in blocks:
        for rotate_v in (False, True) if hb is not None else (False,):
            for center_k in (False, True):
                for kh in (False, True) if k_half else (False,):
                    m = KVMethod(kind="int", bits=bits, had_block=hb, rotate_v=rotate_v,
                                 center_k=center_k, k_half_meta=kh)  # fmt: skip
                    out.append(m.resolve(head_dim))
    return out


def calib_windows(tokenizer, cfg: RecipeConfig) -> list[torch.Tensor]:
    """Per text, ``[num_windows, window_len (+1 with BOS)]`` calibration token ids."""
    from sawkv.eval.tasks import cached_windows, prefix_ids

    bos = bool(prefix_ids(tokenizer))  # a model that uses a BOS sees one, as in evaluation
    return [
        cached_windows(tokenizer, t, cfg.tokens_per_text, cfg.window_len, "calib", bos)
        for t in cfg.texts
    ]


def sens_windows(per_text: list[torch.Tensor], cfg: RecipeConfig) -> torch.Tensor:
    """``[num_texts * num_sens_windows, sens_len (+1 with BOS)]``: per text, chunks of
    ``sens_len`` tokens spread evenly over its first calibration window, each with the
    window's BOS (if any) in front."""
    out = []
    for w in per_text:
        bos = w.shape[1] - cfg.window_len  # 1 if the windows carry a BOS
        stride = cfg.window_len // cfg.num_sens_windows
        for j in range(cfg.num_sens_windows):
            chunk = w[0, bos + j * stride : bos + j * stride + cfg.sens_len]
            out.append(torch.cat([w[0, :bos], chunk]))
    return torch.stack(out)


# ---- 1. capture ---------------------------------------------------------------------------
def query_positions(seq_len: int, num_queries: int) -> torch.Tensor:
    """``num_queries`` positions spread evenly over ``[1, seq_len)`` (the last one included):
    the queries whose attention output scores a format. Every key is still quantized and
    read; fewer query rows only make the error estimate cheaper (attention is O(queries))."""
    n = min(num_queries, seq_len - 1)
    return torch.linspace(seq_len - 1, 1, n).round().long().flip(0).unique()


@contextlib.contextmanager
def _capture_qkv(sink: dict, num_queries: int):
    """Wrap transformers' SDPA attention to record post-RoPE q, k, v of each layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def wrapper(module, query, key, value, attention_mask, **kwargs):
        # query [1, Hq, S, d]; key, value [1, Hkv, S, d] (GQA not yet repeated)
        scale = kwargs.get("scaling") or getattr(module, "scaling", None)
        pos = query_positions(query.shape[2], num_queries)
        sink.setdefault(module.layer_idx, []).append(
            (query[0, :, pos].detach().float().cpu(), key[0].detach().float().cpu(),
             value[0].detach().float().cpu(), scale, kwargs.get("sliding_window"), pos)
        )  # fmt: skip
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    old = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = wrapper
    try:
        yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = old
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]


@torch.no_grad()
def capture_qkv(
    model, windows: torch.Tensor, num_queries: int = 64, progress: Progress | None = None
) -> dict:
    """Per layer, a list over windows of ``(q [Hq, Q, d], k [Hkv, S, d], v, scale, window,
    q_pos [Q])``: the queries at ``Q = num_queries`` sampled positions, every key and value."""
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    sink: dict = {}
    device = next(model.parameters()).device
    with _capture_qkv(sink, num_queries):
        for i, w in enumerate(windows):
            model(w[None].to(device), use_cache=False)
            if progress is not None:
                progress("capture", i + 1, len(windows))
    num_layers = attention_shape(model.config)[0]
    if sorted(sink) != list(range(num_layers)):
        raise ValueError(f"captured layers {sorted(sink)}, expected 0..{num_layers - 1}")
    return sink


def key_means_of(captured: dict) -> torch.Tensor:
    """``[num_layers, num_kv_heads, head_dim]`` mean key over every captured token.

    The first token of each window (BOS or an attention sink) is kept: its key is an outlier
    that draws much of the attention, and a mean that leans towards it quantizes it better
    (measured on SmolLM2: KL 0.0307 with such means vs 0.0338 without the first tokens).
    """
    means = []
    for layer in sorted(captured):
        ks = torch.cat([data[1] for data in captured[layer]], dim=1)  # [H, N, d]
        means.append(ks.double().mean(dim=1).float())
    return torch.stack(means)


def qk_energies(captured: dict, k_means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_energy, k_energy)``, each ``[num_layers, num_kv_heads, head_dim]``: mean ``q_i^2``
    over the captured queries of the heads that read each KV head, and mean ``(k_i - mu_i)^2``
    over every captured key."""
    qs, ks = [], []
    for layer in sorted(captured):
        q = torch.cat([data[0] for data in captured[layer]], dim=1)  # [Hq, Q, d]
        k = torch.cat([data[1] for data in captured[layer]], dim=1)  # [Hkv, N, d]
        hkv, d = k.shape[0], k.shape[-1]
        qs.append(q.double().reshape(hkv, -1, d).pow(2).mean(1))  # GQA: heads of a KV head
        ks.append((k.double() - k_means[layer].double()[:, None]).pow(2).mean(1))
    return torch.stack(qs).float(), torch.stack(ks).float()


def smooth_captured(captured: dict, k_scale: torch.Tensor) -> None:
    """Move captured queries and keys into the smoothed space in place: ``q * s``, ``k / s``
    (attention outputs are unchanged)."""
    for layer in sorted(captured):
        s = k_scale[layer]  # [Hkv, d]
        for i, (q, k, *rest) in enumerate(captured[layer]):
            g = q.shape[0] // s.shape[0]
            captured[layer][i] = (q * s.repeat_interleave(g, 0)[:, None], k / s[:, None], *rest)


def _probe_smoothing(score: KLScorer, captured: dict, mu: torch.Tensor, head_dim: int):
    """``(k_scale, {"off": KL, "on": KL})``: every layer's smoothing scales, and the KL of
    uniform ``int4-bdr{min(128, d)}-kv-kc`` without and with them on the calibration chunks
    (the format search then runs on whichever is lower)."""
    from sawkv.quant.methods import parse_method
    from sawkv.quant.recipe import smoothing_scales

    k_scale = smoothing_scales(*qk_energies(captured, mu))
    probe = [parse_method("int4-bdr-kv-kc", head_dim)] * len(captured)
    kls = {"off": score(probe), "on": score.smoothed(mu / k_scale, k_scale)(probe)}
    return k_scale, kls


# ---- 2. local format choice ----------------------------------------------------------------
def causal_attention(
    q, k, v, scale: float, window: int | None = None, q_pos: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact causal GQA attention of queries at positions ``q_pos`` (default: all).

    Shapes: ``q [Hq, Q, d]``, ``k, v [Hkv, S, d]``, ``q_pos [Q]`` -> ``[Hq, Q, d]``.
    """
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    kpos = torch.arange(k.shape[1])
    qpos = kpos if q_pos is None else q_pos
    mask = kpos[None, :] <= qpos[:, None]
    if window:
        mask &= qpos[:, None] - kpos[None, :] < window
    logits = (q @ k.transpose(1, 2)) * scale
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1) @ v


def fake_quant_heads(
    x: torch.Tensor,
    bits: int,
    had_block: int | None,
    mean: torch.Tensor | None,
    group_size: int | None = None,
) -> torch.Tensor:
    """``x [H, S, d]`` -> what a token-wise ``int{bits}`` page returns, in model space.

    The same numerics as :meth:`KVMethod.fake_quant` (center, rotate, per-token min/max
    quantize, dequantize, rotate back, add the mean), with the rotation as one matmul and no
    INT4 packing (lossless), so the many candidates of a calibration stay cheap.
    ``group_size``: one (scale, min) per that many rotated elements (None: per token).
    """
    from sawkv.quant.hadamard import rotate_matmul
    from sawkv.quant.int4 import dequantize_int, quantize_int

    if mean is not None:
        mean = mean.to(device=x.device, dtype=x.dtype)[:, None, :]
    y = x if mean is None else x - mean
    if had_block is not None:
        y = rotate_matmul(y, had_block)
    y = dequantize_int(*quantize_int(y, bits, group_size))
    if had_block is not None:
        y = rotate_matmul(y, had_block)
    return y if mean is None else y + mean


def format_errors(
    methods: list[KVMethod], layer_data: list, k_mean: torch.Tensor
) -> dict[str, float]:
    """Relative error ``sum |o_hat - o|^2 / sum |o|^2`` of one layer's attention output with
    K/V stored by each of ``methods`` (queries, keys and values of every captured window).

    Args:
        methods: resolved token-wise methods (no group size; ``-kh`` allowed).
        layer_data: the layer's captured windows (see :func:`capture_qkv`).
        k_mean: ``[num_kv_heads, head_dim]`` key mean (used by methods that center keys).
    """
    num = dict.fromkeys((m.name for m in methods), 0.0)
    den = 0.0
    for q, k, v, scale, window, pos in layer_data:
        ref = causal_attention(q, k, v, scale, window, pos)
        den += float(ref.pow(2).sum())
        # a key format is (bits, block, centering, key group), a value format (bits, block
        # if -kv)
        keys: dict[tuple, torch.Tensor] = {}
        values: dict[tuple, torch.Tensor] = {}
        for m in methods:
            group = m.group_size_for(k.shape[-1], is_key=True)
            kf = (m.bits, m.had_block, m.center_k, group)
            vf = (m.bits, m.had_block if m.rotate_v else None)
            if kf not in keys:
                mean = k_mean if m.center_k else None
                keys[kf] = fake_quant_heads(k, m.bits, m.had_block, mean, group)
            if vf not in values:
                values[vf] = fake_quant_heads(v, *vf, None)
            out = causal_attention(q, keys[kf], values[vf], scale, window, pos)
            num[m.name] += float((out - ref).pow(2).sum())
    return {name: n / max(den, 1e-30) for name, n in num.items()}


def best_formats(
    captured: dict,
    k_means: torch.Tensor,
    candidates: list[KVMethod],
    progress: Progress | None = None,
    stage: str = "formats",
) -> tuple[list[KVMethod], list[dict[str, float]]]:
    """Per layer, the candidate with the lowest attention-output error, and all errors."""
    chosen, errors = [], []
    layers = sorted(captured)
    for i, layer in enumerate(layers):
        errs = format_errors(candidates, captured[layer], k_means[layer])
        chosen.append(min(candidates, key=lambda m: (errs[m.name], m.name)))
        errors.append(errs)
        if progress is not None:
            progress(stage, i + 1, len(layers))
    return chosen, errors


# ---- 3. end-to-end sensitivity ---------------------------------------------------------------
def kl_per_token(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(ref) || softmax(logits))`` per position: ``[..., V]`` -> ``[...]``."""
    lp_ref = F.log_softmax(ref_logits.float(), -1)
    return (lp_ref.exp() * (lp_ref - F.log_softmax(logits.float(), -1))).sum(-1)


class _FakeQuantLayer(DynamicLayer):
    """A plain layer that stores K/V as :func:`fake_quant_heads` returns them (calibration
    only: the same numerics as :class:`~sawkv.hf.SawKVLayer` without its byte bookkeeping,
    which would cost more than the model on a CPU)."""

    def __init__(
        self, method: KVMethod, k_mean: torch.Tensor | None, num_sink: int = 0,
        k_scale: torch.Tensor | None = None, k_bits: int | None = None,
        v_bits: int | None = None, k_group: int | None = None,
    ):  # fmt: skip
        super().__init__()
        self.method, self.k_mean, self.num_sink = method, k_mean, num_sink
        # what-if overrides (benchmarks/saw_int4_keys.py): K/V bits, key metadata group size
        # (default: the method's, e.g. half a key with -kh)
        self.k_bits, self.v_bits = k_bits or method.bits, v_bits or method.bits
        self.k_group = k_group
        # [H, 1, d]: keys are [B, H, S, d]
        self.k_scale = None if k_scale is None else k_scale.float()[:, None]

    def update(self, key_states, value_states, *args, **kwargs):
        m, mu = self.method, self.k_mean if self.method.center_k else None
        hb_v = m.had_block if m.rotate_v else None
        s = self.k_scale
        ks = key_states.float() if s is None else key_states.float() / s.to(key_states.device)
        group = self.k_group or m.group_size_for(ks.shape[-1], is_key=True)
        k = torch.stack([fake_quant_heads(x, self.k_bits, m.had_block, mu, group)
                         for x in ks])  # fmt: skip
        if s is not None:
            k = k * s.to(k.device)
        v = torch.stack([fake_quant_heads(x.float(), self.v_bits, hb_v, None)
                         for x in value_states])  # fmt: skip
        k, v = k.to(key_states.dtype), v.to(value_states.dtype)
        # attention sinks: positions below num_sink stay exact ([B, H, S, d], S = new tokens)
        n = max(0, min(self.num_sink - self.get_seq_length(), k.shape[2]))
        if n:
            k[:, :, :n], v[:, :, :n] = key_states[:, :, :n], value_states[:, :, :n]
        return super().update(k, v, *args, **kwargs)


def fake_quant_cache(
    layers: list[KVMethod],
    k_means: torch.Tensor | None,
    num_sink: int = 0,
    k_scale: torch.Tensor | None = None,
) -> Cache:
    """A transformers cache whose layer ``i`` reads K/V quantized by ``layers[i]``, except each
    sequence's first ``num_sink`` tokens (exact). With ``k_scale`` ``[L, H, d]`` keys are
    quantized as ``k / k_scale`` (``k_means`` their means) and read back times ``k_scale``."""
    means = [None if k_means is None else k_means[i].float() for i in range(len(layers))]
    scales = [None if k_scale is None else k_scale[i] for i in range(len(layers))]
    return Cache(layers=[_FakeQuantLayer(m, mu, num_sink, sc)
                         for m, mu, sc in zip(layers, means, scales)])  # fmt: skip


@torch.no_grad()
def mean_kls(model, windows: list[torch.Tensor], configs: list[list[KVMethod]], k_means,
             progress: Progress | None = None, k_scale=None) -> list[float]:  # fmt: skip
    """Mean per-token KL to full precision for each config (``config[i]``: layer i's format;
    ``k_scale``: a recipe's key smoothing, ``k_means`` then being the smoothed keys' means).

    Windows are the outer loop so only one window's reference logits (``[S, vocab]``) are
    alive at a time (Gemma's vocabulary is 262K).
    """
    num_layers = attention_shape(model.config)[0]
    device = next(model.parameters()).device
    totals, count, done = [0.0] * len(configs), 0, 0
    for w in windows:
        ids = w[None].to(device)
        plain = Cache(layers=[DynamicLayer() for _ in range(num_layers)])
        ref = model(ids, **cache_kwargs(model, plain), use_cache=True).logits[0]
        for j, layers in enumerate(configs):
            cache = fake_quant_cache(list(layers), k_means, k_scale=k_scale)
            logits = model(ids, **cache_kwargs(model, cache), use_cache=True).logits[0]
            totals[j] += float(kl_per_token(ref, logits).sum())
            done += 1
            if progress is not None:
                progress("sensitivity", done, len(windows) * len(configs))
        count += ids.shape[1]
    return [t / count for t in totals]


def calibrate_recipe(
    model, tokenizer, cfg: RecipeConfig | None = None, progress: Progress | None = None
) -> Recipe:
    """Build a :class:`Recipe` for ``model`` (steps in the module docstring).

    Args:
        model, tokenizer: a transformers causal LM (fp32 recommended) and its tokenizer.
        cfg: :class:`RecipeConfig`.
        progress: optional callable ``(stage, done, total)``.
    Returns:
        the recipe, with its key means and calibration facts in ``info``.
    """
    cfg = cfg or RecipeConfig()
    t0 = time.perf_counter()
    num_layers, num_kv_heads, head_dim = attention_shape(model.config)
    budget = cfg.budget if cfg.budget is not None else default_budget(head_dim)
    if budget < plain_int4_bits(head_dim) - 1e-9:
        raise ValueError(
            f"budget {budget} is below plain per-token INT4 at head_dim {head_dim} "
            f"({plain_int4_bits(head_dim)} bits per element): no servable recipe fits"
        )
    per_text = calib_windows(tokenizer, cfg)
    captured = capture_qkv(model, torch.cat(per_text), cfg.num_queries, progress)
    mu = key_means_of(captured)
    score = KLScorer(model, sens_windows(per_text, cfg), mu)
    s_full, on, kl_smooth = None, [False] * num_layers, {}
    if cfg.smooth_keys:
        s_full, kl_smooth = _probe_smoothing(score, captured, mu, head_dim)
        if kl_smooth["on"] < kl_smooth["off"]:
            on = [True] * num_layers
            smooth_captured(captured, s_full)
    k_means, k_scale = smoothing_masks(mu, s_full, on)
    score = score.smoothed(k_means, k_scale)
    candidates = candidate_formats(head_dim, 4, cfg.min_had_block, k_half=cfg.k_half_meta)
    _, errors = best_formats(captured, k_means, candidates, progress, "int4")
    del captured
    start, layers, kl_starts, kl_low, changes = search_formats(
        score, errors, candidates, head_dim, budget, cfg.num_alternatives, cfg.num_passes,
        cfg.min_z, progress,
    )  # fmt: skip
    flips = []
    if cfg.smooth_keys:  # per layer, with the formats chosen: keep whichever is better
        on, kl_low, flips = smoothing_descent(score, layers, mu, s_full, on, cfg.min_z, progress)
        k_means, k_scale = smoothing_masks(mu, s_full, on)
        score = score.smoothed(k_means, k_scale)
    # End-to-end KL costs a forward per probe: only the layers whose INT4 attention-output
    # error is largest are probed (all of them if asked).
    layers, kl_recipe, drops, promoted, kh_vs_int8 = spend_on_high(
        score, layers, kl_low, errors, head_dim, budget, cfg.num_sens_layers, cfg.high_bits,
        progress,
    )  # fmt: skip
    # each layer's INT4 format's error (what chose the probed layers)
    errs = [e[replace(m, bits=4).name] for e, m in zip(errors, layers)]
    num_sink, kl_sinks = _best_sinks(score, layers, cfg.sink_candidates, {0: kl_recipe})
    info = {
        "texts": list(cfg.texts),
        "tokens_per_text": cfg.tokens_per_text,
        "window_len": cfg.window_len,
        "sens_len": cfg.sens_len,
        "num_sens_windows": cfg.num_sens_windows,
        "min_z": cfg.min_z,
        "start": start,
        "kl_starts": kl_starts,
        "descent": changes,
        "int8_layers": promoted,
        "kl_all_int4": kl_low,
        "kl_key_smoothing": kl_smooth,
        "smoothed_layers": [i for i, x in enumerate(on) if x],
        "smoothing_flips": flips,
        "kl_recipe": kl_sinks[num_sink],
        "kl_sinks": {str(n): kl for n, kl in kl_sinks.items()},
        "kl_drop_int8": {str(i): d for i, d in drops.items()},
        "kl_k_half_vs_int8": kh_vs_int8,
        "k_half_layers": [i for i, m in enumerate(layers) if m.k_half_meta],
        "int4_attn_error": errs,
        "num_kl_forwards": score.num_calls,
        "seconds": round(time.perf_counter() - t0, 1),
        **cfg.extra,
    }
    use_means = any(m.center_k for m in layers)
    return Recipe(tuple(layers), head_dim, num_kv_heads, k_means if use_means else None,
                  budget, info, num_sink=num_sink, k_scale=k_scale)  # fmt: skip


def _best_sinks(score: KLScorer, layers, candidates, known: dict[int, float]):
    """(the sink count of lowest KL, KL by candidate) for the final ``layers``."""
    kls = {n: known[n] if n in known else score(layers, num_sink=n) for n in candidates}
    return min(kls, key=lambda n: (kls[n], n)), kls


def choose_num_sink(model, tokenizer, recipe: Recipe, cfg: RecipeConfig | None = None) -> Recipe:
    """Step 5 alone: ``recipe`` with the sink count of lowest KL on the calibration windows
    (for recipes stored before sinks were part of calibration; ``info["kl_sinks"]`` records
    the scores)."""
    cfg = cfg or RecipeConfig()
    score = KLScorer(model, sens_windows(calib_windows(tokenizer, cfg), cfg), recipe.k_means,
                     recipe.k_scale)  # fmt: skip
    num_sink, kls = _best_sinks(score, list(recipe.layers), cfg.sink_candidates, {})
    info = {**recipe.info, "kl_sinks": {str(n): kl for n, kl in kls.items()}}
    return replace(recipe, num_sink=num_sink, info=info)


@contextlib.contextmanager
def rich_progress(title: str):
    """A rich progress bar, one row per stage; yields the ``(stage, done, total)`` callable."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    cols = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn())  # fmt: skip
    with Progress(*cols) as bar:
        bar.console.log(title)
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)
            if done == total:  # one line per stage: bars do not render in logs (nohup runs)
                bar.console.log(f"{stage}: {total}/{total}")

        yield update
