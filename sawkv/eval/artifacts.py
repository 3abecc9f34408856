"""Calibration artifacts of the baseline methods: fitted once per model on calibration windows.

* k-means codebooks (:class:`~sawkv.quant.kmeans.KMeansMethod`) from captured post-RoPE K/V;
* query second moments ``E[q q^T]`` per (layer, KV head) for GPTQ keys
  (:class:`~sawkv.quant.hessian.GPTQMethod`), from post-RoPE queries;
* sensitivity profiles for mixed precision (:mod:`sawkv.eval.sensitivity`).

All come from ``token_windows(..., split="calib")`` (the calibration region of the text, which
ends before the evaluation region starts) and are stored under ``model_cache_dir(model)`` as
``<artifact>.pt``, so a second run loads them in milliseconds.
"""

from __future__ import annotations

import contextlib
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.cache_utils import Cache, DynamicLayer

from sawkv.hf.cache import attention_shape, cache_kwargs


@dataclass(frozen=True)
class CalibConfig:
    """Calibration budget: ``num_tokens`` of ``text`` in windows of ``window_len``."""

    text: str = "austen"
    num_tokens: int = 1024
    window_len: int = 512
    sens_tokens: int = 256  # sensitivity runs one forward per (layer, head): kept smaller

    def tag(self, num_tokens: int | None = None) -> str:
        return f"{self.text}-{num_tokens or self.num_tokens}x{self.window_len}"


def calib_windows(tokenizer, cfg: CalibConfig, num_tokens: int | None = None) -> torch.Tensor:
    """``[num_windows, window_len]`` calibration token ids (disjoint from evaluation windows)."""
    from sawkv.eval.tasks import cached_windows, prefix_ids

    n = num_tokens or cfg.num_tokens
    bos = bool(prefix_ids(tokenizer))  # models that use a BOS see one, as in evaluation
    return cached_windows(tokenizer, cfg.text, n, min(cfg.window_len, n), "calib", bos)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_kv(model, windows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE K and V of every layer over all tokens of ``windows``.

    Returns:
        per layer ``(k, v)``, each ``[num_windows * window_len, num_kv_heads, head_dim]`` fp32.
        Every layer keeps all tokens (plain layers, also for sliding-window models).
    """
    num_layers = attention_shape(model.config)[0]
    ks: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
    vs: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
    for w in windows:
        cache = Cache(layers=[DynamicLayer() for _ in range(num_layers)])
        model(w[None].to(_device(model)), **cache_kwargs(model, cache), use_cache=True)
        for i, layer in enumerate(cache.layers):
            ks[i].append(layer.keys[0].transpose(0, 1).float().cpu())
            vs[i].append(layer.values[0].transpose(0, 1).float().cpu())
    return [(torch.cat(k), torch.cat(v)) for k, v in zip(ks, vs)]


@contextlib.contextmanager
def _capture_queries(sink: dict):
    """Temporarily wrap the SDPA attention function to add ``q q^T`` sums into ``sink``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def wrapper(module, query, key, value, attention_mask, **kwargs):
        q = query.detach().double()  # [B, Hq, S, D]
        b, hq, s, d = q.shape
        hkv = key.shape[1]
        # GQA: query heads [g*r, (g+1)*r) read KV head g (transformers' repeat_kv order).
        qg = q.reshape(b, hkv, hq // hkv, s, d).transpose(1, 2).reshape(-1, hkv, s, d)
        acc = torch.einsum("nhsd,nhse->hde", qg, qg).cpu()
        li = module.layer_idx
        tot, cnt = sink.get(li, (0.0, 0))
        sink[li] = (tot + acc, cnt + qg.shape[0] * s)
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
def query_hessians(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """``E[q q^T]`` of post-RoPE queries per layer: ``[num_kv_heads, head_dim, head_dim]`` fp32,
    averaged over the query heads that share each KV head and over all tokens."""
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    sink: dict = {}
    with _capture_queries(sink):
        for w in windows:
            model(w[None].to(_device(model)), use_cache=False)
    num_layers = attention_shape(model.config)[0]
    if sorted(sink) != list(range(num_layers)):
        raise ValueError(f"captured queries of layers {sorted(sink)}, expected 0..{num_layers - 1}")
    return [(sink[i][0] / sink[i][1]).float() for i in range(num_layers)]


def _cached(path: Path, compute, log=print):
    """Load ``path`` if present, else compute, save and return.

    Artifacts are tensors and lists/dicts of tensors, so they load with ``weights_only=True``:
    a cache file never runs code. A file that is not plain tensors is recomputed.
    """
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except pickle.UnpicklingError as e:
            log(f"[calib] {path.name} is not a plain tensor file ({e}); recomputing")
    t0 = time.perf_counter()
    obj = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    log(f"[calib] {path.name}: {time.perf_counter() - t0:.0f} s")
    return obj


def prepare_method(method, model, tokenizer, model_name: str, k_means=None, cfg=None, log=print):
    """Fit (or load) whatever ``method`` needs from calibration data; other methods pass through.

    Args:
        method: a resolved method object (from ``parse_method(name, head_dim)``).
        model, tokenizer: the loaded model.
        model_name: name or path (selects ``model_cache_dir``).
        k_means: key means (used by the sensitivity profile of mixed precision).
        cfg: :class:`CalibConfig`.
    Returns:
        the method, calibrated.
    """
    from sawkv.models.hub import model_cache_dir
    from sawkv.quant.hessian import GPTQMethod
    from sawkv.quant.kmeans import KMeansMethod
    from sawkv.quant.mixed import MixedMethod
    from sawkv.quant.recipe import is_saw_int4

    if is_saw_int4(method):  # the model's saw-int4 recipe (built on first use)
        from sawkv.eval.calibrate import get_recipe

        return get_recipe(model, tokenizer, model_name)
    cfg = cfg or CalibConfig()
    root = Path(model_cache_dir(model_name))
    if isinstance(method, KMeansMethod) and method.needs_calibration:
        path = root / f"codebooks_{method.name}_{cfg.tag()}.pt"

        def fit():
            kv = capture_kv(model, calib_windows(tokenizer, cfg))
            return method.fit(kv).codebooks

        from dataclasses import replace

        return replace(method, codebooks=_cached(path, fit, log))
    if isinstance(method, GPTQMethod) and method.needs_calibration:
        path = root / f"query_hessians_{cfg.tag()}.pt"
        hs = _cached(path, lambda: query_hessians(model, calib_windows(tokenizer, cfg)), log)
        return method.fit(hs)
    if isinstance(method, MixedMethod) and method.needs_calibration:
        from sawkv.eval.sensitivity import sensitivity_profile

        low = method.low_method.resolve(attention_shape(model.config)[2])
        path = root / f"sensitivity_{low.name}_{cfg.tag(cfg.sens_tokens)}.pt"

        def profile():
            wins = calib_windows(tokenizer, cfg, cfg.sens_tokens)
            return sensitivity_profile(model, wins, low, k_means)

        return method.fit(_cached(path, profile, log))
    return method
