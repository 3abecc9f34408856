"""Perplexity of a model whose attention reads K/V through a :class:`SawKVCache`.

Every window is one forward pass (no BOS token added) with a fresh cache, so attention sees the
quantized K/V for the whole window, prefill included. NLL is summed over the window's
``window_len - 1`` predicted tokens; perplexity is ``exp(total NLL / total tokens)``, and its
standard error comes from the spread of the per-window mean NLL (delta method:
``se(ppl) = ppl * se(mean NLL)``).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from sawkv.hf.cache import SawKVCache, attention_shape, cache_kwargs, resolve_for_model
from sawkv.quant.methods import KVMethod, parse_method


@torch.no_grad()
def window_nll(model, window: torch.Tensor, cache: SawKVCache) -> tuple[float, int]:
    """Summed NLL and token count of one ``[window_len]`` window read through ``cache``."""
    device = next(model.parameters()).device
    ids = window[None].to(device)
    logits = model(ids, **cache_kwargs(model, cache), use_cache=True).logits[0, :-1]
    nll = F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum")
    return float(nll), ids.shape[1] - 1


def summarize(nlls: list[float], counts: list[int]) -> dict:
    """Perplexity and its standard error from per-window summed NLLs and token counts."""
    total, n = sum(nlls), sum(counts)
    ppl = math.exp(total / n)
    means = [a / c for a, c in zip(nlls, counts)]
    if len(means) > 1:
        mu = sum(means) / len(means)
        var = sum((m - mu) ** 2 for m in means) / (len(means) - 1)
        se_nll = math.sqrt(var / len(means))
    else:
        se_nll = float("nan")
    return {"ppl": ppl, "ppl_se": ppl * se_nll, "nll_per_token": total / n, "num_tokens": n}


def perplexity(
    model,
    windows: torch.Tensor,
    method: str | KVMethod,
    k_means: torch.Tensor | None = None,
    kc_mode: str = "static",
    progress=None,
    task=None,
    num_sink: int | None = None,
) -> dict:
    """Perplexity with K/V stored by ``method``.

    Args:
        model: transformers causal LM (eval mode).
        windows: ``[num_windows, window_len]`` token ids.
        method: KV method name or :class:`KVMethod`.
        k_means: ``[num_layers, num_kv_heads, head_dim]`` static key means for ``-kc``.
        kc_mode: ``"static"`` or ``"prefill"`` (see :class:`sawkv.hf.SawKVCache`).
        progress, task: optional ``rich.progress.Progress`` and task id, advanced per window.
        num_sink: first tokens of each window kept in the model dtype (see ``SawKVCache``);
            None: the method's own (a ``saw-int4`` recipe's sinks), else none.
    Returns:
        dict with ``method``, ``kc_mode``, ``ppl``, ``ppl_se``, ``nll_per_token``,
        ``num_tokens``, ``num_windows``, ``window_nll`` (per-window mean NLL, for paired
        comparisons), ``kv_bytes`` (stored K/V bytes of one window, all layers),
        ``bits_per_element`` (measured from the cache), ``seconds``.
    """
    windows = torch.as_tensor(windows)
    if windows.ndim != 2 or windows.shape[1] < 2:
        shape = tuple(windows.shape)
        raise ValueError(f"windows must be [num_windows, window_len >= 2], got {shape}")
    t0 = time.perf_counter()
    nlls, counts = [], []
    kv_bytes, bits, name = 0, float("nan"), str(method)
    method = resolve_for_model(method, model)  # once: saw-int4 loads (or builds) the recipe
    for w in windows:
        cache = SawKVCache(model, method, k_means=k_means, kc_mode=kc_mode, num_sink=num_sink)
        nll, n = window_nll(model, w, cache)
        nlls.append(nll)
        counts.append(n)
        kv_bytes, bits, name = cache.kv_bytes(), cache.bits_per_element(), cache.method.name
        if progress is not None:
            progress.advance(task)
    kc = kc_mode if "kc" in name.split("-") else None
    if num_sink is None:
        num_sink = getattr(method, "num_sink", 0)
    out = {"method": name, "kc_mode": kc, "num_sink": num_sink}
    if hasattr(method, "summary"):  # a per-layer recipe: say which layers got what
        out["recipe"] = method.summary()
    m = parse_method(name)
    if m.kind == "int" and not m.is_packed_storage:  # INT3/INT2 are simulated: one code a byte
        out["stored_bits_per_element"] = bits
        bits = m.bits_per_element(attention_shape(model.config)[2])  # a bit-packed layout's size
    out.update(summarize(nlls, counts))
    out.update(
        num_windows=len(nlls),
        window_nll=[a / c for a, c in zip(nlls, counts)],
        kv_bytes=kv_bytes,
        bits_per_element=bits,
        seconds=time.perf_counter() - t0,
    )
    return out


def split_label(label: str, default_kc_mode: str = "static") -> tuple[str, str]:
    """``"int4-bdr64-kc@prefill"`` -> ``("int4-bdr64-kc", "prefill")``; no mode: the default."""
    name, opts = parse_label(label, default_kc_mode)
    return name, opts["kc_mode"]


def parse_label(label: str, default_kc_mode: str = "static") -> tuple[str, dict]:
    """A method label: a method name plus ``@`` options, ``static`` / ``prefill`` (key centering
    mode) and ``sink{N}`` (keep the first N tokens in the model dtype).

    >>> parse_label("int4-bdr64-kv-kc@prefill@sink4")
    ('int4-bdr64-kv-kc', {'kc_mode': 'prefill', 'num_sink': 4})

    Without ``@sink{N}``, ``num_sink`` is None: the method's own (a recipe's sinks), else 0.
    """
    name, *opts = label.split("@")
    out = {"kc_mode": default_kc_mode, "num_sink": None}
    for o in (o.strip() for o in opts):
        if o in ("static", "prefill"):
            out["kc_mode"] = o
        elif o.startswith("sink") and o[4:].isdigit():
            out["num_sink"] = int(o[4:])
        else:
            raise ValueError(
                f"method label {label!r}: unknown option '@{o}' "
                "(expected @static, @prefill or @sink{N})"
            )
    return name.strip(), out


def compare_methods(
    model,
    windows: torch.Tensor,
    labels: list[str],
    key_means=None,
    default_kc_mode: str = "static",
    done: dict[str, dict] | None = None,
    on_result=None,
) -> list[dict]:
    """Perplexity of each method label on the same windows, with a rich progress bar.

    Args:
        model: transformers causal LM.
        windows: ``[num_windows, window_len]`` token ids.
        labels: method labels (:func:`parse_label`): names with optional ``@prefill`` /
            ``@sink{N}``.
        key_means: callable returning the ``[L, H, D]`` static key means (called only if a
            static ``-kc`` method is run, so calibration happens on first use), or a tensor.
        done: results already computed (label -> result), reused instead of re-running.
        on_result: called with the list of results after each method (e.g. to save JSON).
    Returns:
        results in ``labels`` order, each with a ``label`` key.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from sawkv.hf.cache import attention_shape
    from sawkv.quant.methods import parse_method

    head_dim = attention_shape(model.config)[2]
    parsed = [(lab, *parse_label(lab, default_kc_mode)) for lab in labels]
    for _, name, _ in parsed:  # fail fast on a bad name, before any model time is spent
        parse_method(name, head_dim)
    done, results, mu = dict(done or {}), [], key_means
    cols = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*cols) as progress:
        for i, (label, name, opts) in enumerate(parsed):
            if label in done:
                results.append(done[label])
                continue
            task = progress.add_task(label, total=len(windows))
            is_static_kc = parse_method(name).center_k and opts["kc_mode"] == "static"
            if is_static_kc and callable(mu):
                mu = mu()
            k_means = mu if is_static_kc else None
            r = perplexity(
                model,
                windows,
                name,
                k_means,
                opts["kc_mode"],
                progress,
                task,
                num_sink=opts["num_sink"],
            )
            r["label"] = label
            results.append(r)
            # one line per method: progress bars do not render in logs (nohup runs)
            progress.console.log(
                f"{label}: ppl {r['ppl']:.4f} ± {r['ppl_se']:.4f} ({r['seconds']:.0f} s)"
            )
            if on_result is not None:  # keep results not yet reached, so a crash loses none
                on_result(results + [done[lab] for lab, *_ in parsed[i + 1 :] if lab in done])
    return results
