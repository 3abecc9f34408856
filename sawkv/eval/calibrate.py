"""Key-mean calibration for key centering (``-kc``).

mu is the per-(layer, KV head) mean of the post-RoPE keys over calibration windows
(``token_windows(..., split="calib")``, which never overlap the evaluation windows). It is
computed once per model by running the model with a plain ``DynamicCache`` and averaging the keys
the cache holds, then stored as ``k_means.safetensors`` in the model's cache directory
(``~/.cache/sawkv/<model>/``, root overridable with ``SAWKV_CACHE``).

Subtracting mu is exact for attention (softmax ignores the shift q.mu shared by all keys of a
query), so only the write path changes. The alternative "prefill mean" (each sequence's own
prefill key mean, ``SawKVCache(..., kc_mode="prefill")``) is evaluated for comparison only: it is
not exact once pages are shared between sequences (prefix caching), the static mu is.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from sawkv.hf.cache import attention_shape, cache_kwargs

KEY_MEANS_FILE = "k_means.safetensors"


def key_means_path(model_name: str) -> Path:
    """Where the key means of ``model_name`` live (inside its sawkv cache directory)."""
    from sawkv.models.hub import model_cache_dir

    return Path(model_cache_dir(model_name)) / KEY_MEANS_FILE


@torch.no_grad()
def keys_mean(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean post-RoPE key per (layer, KV head) over all tokens of ``windows``.

    Args:
        model: a transformers causal LM.
        windows: ``[num_windows, window_len]`` token ids (no BOS added).
    Returns:
        ``[num_layers, num_kv_heads, head_dim]`` fp32.
    """
    if windows.ndim != 2 or windows.numel() == 0:
        raise ValueError(
            f"windows must be a non-empty [num_windows, window_len] tensor, got "
            f"{tuple(windows.shape)}"
        )
    num_layers, num_kv_heads, head_dim = attention_shape(model.config)
    total = torch.zeros(num_layers, num_kv_heads, head_dim, dtype=torch.float64)
    count = 0
    device = next(model.parameters()).device
    for w in windows:
        cache = DynamicCache(config=model.config)
        model(w[None].to(device), **cache_kwargs(model, cache), use_cache=True)
        for i, layer in enumerate(cache.layers):
            # keys [1, H, S, D]; a sliding-window layer keeps only its window: its mean is over
            # the tokens it holds, weighted like the full layers (a small bias we accept).
            k = layer.keys.double()
            total[i] += k.mean(dim=2)[0].cpu() * w.numel()
        count += w.numel()
    return (total / count).float()


def calibrate_key_means(
    model,
    tokenizer,
    model_name: str,
    num_tokens: int = 4096,
    window_len: int = 1024,
    text_name: str = "austen",
    save: bool = True,
) -> torch.Tensor:
    """Compute (and by default save) the key means of a model on calibration text.

    Args:
        model, tokenizer: the loaded model (any dtype/device).
        model_name: name or path as given to ``sawkv.models.hub`` (chooses the cache directory).
        num_tokens, window_len: calibration budget; windows come from ``split="calib"``.
        text_name: corpus for ``sawkv.eval.data.token_windows``.
    Returns:
        ``[num_layers, num_kv_heads, head_dim]`` fp32 key means.
    """
    from sawkv.eval.data import token_windows

    windows = token_windows(tokenizer, text_name, num_tokens, window_len, split="calib")
    mu = keys_mean(model, torch.as_tensor(windows))
    if save:
        path = key_means_path(model_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"text": text_name, "num_tokens": str(num_tokens), "window_len": str(window_len)}
        save_file({"k_means": mu.contiguous()}, str(path), metadata=meta)
    return mu


def load_key_means(model_name: str) -> torch.Tensor | None:
    """Stored key means ``[num_layers, num_kv_heads, head_dim]`` of ``model_name``, or None."""
    try:
        path = key_means_path(model_name)
    except (ValueError, FileNotFoundError, ImportError):
        return None
    if not path.is_file():
        return None
    return load_file(str(path))["k_means"]


def get_key_means(model, tokenizer, model_name: str | None, **calib_kwargs) -> torch.Tensor:
    """Stored key means, calibrating them on first use; zeros with a warning if impossible.

    ``model_name=None`` (e.g. random weights) gives zeros and a warning.
    """
    mu = load_key_means(model_name) if model_name else None
    if mu is not None:
        return mu
    if model_name and tokenizer is not None:
        return calibrate_key_means(model, tokenizer, model_name, **calib_kwargs)
    warnings.warn(
        f"no key means for model {model_name!r} and no way to calibrate them; -kc uses mu = 0",
        stacklevel=2,
    )
    return torch.zeros(attention_shape(model.config))
