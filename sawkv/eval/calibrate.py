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

import torch
from safetensors.torch import save_file
from transformers import DynamicCache

from sawkv.hf.cache import attention_shape, cache_kwargs
from sawkv.models.calibration import KEY_MEANS_FILE, key_means_path, load_key_means, recipe_path

__all__ = [
    "KEY_MEANS_FILE",
    "calibrate_key_means",
    "get_key_means",
    "get_recipe",
    "key_means_path",
    "keys_mean",
    "load_key_means",
    "recipe_path",
]


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


def get_recipe(model, tokenizer, model_name: str, cfg=None, progress=None, save: bool = True):
    """The stored ``saw-int4`` recipe of ``model_name``, calibrating it on first use.

    Args:
        model, tokenizer: the loaded transformers model (fp32 recommended) and tokenizer.
        model_name: name or path (selects the cache directory, see
            :func:`sawkv.models.calibration.model_key`).
        cfg: :class:`sawkv.eval.calibrate_recipe.RecipeConfig` for a new calibration.
        progress: ``(stage, done, total)`` callable; None prints a rich progress bar.
    Returns:
        :class:`sawkv.quant.recipe.Recipe`.
    """
    from sawkv.eval.calibrate_recipe import calibrate_recipe, rich_progress
    from sawkv.models.calibration import load_recipe

    recipe = load_recipe(model_name)
    if recipe is not None:
        return recipe
    if progress is None:
        with rich_progress(f"calibrating saw-int4 for {model_name}") as bar:
            recipe = calibrate_recipe(model, tokenizer, cfg, bar)
    else:
        recipe = calibrate_recipe(model, tokenizer, cfg, progress)
    if save:
        recipe.save(recipe_path(model_name))
    return recipe
