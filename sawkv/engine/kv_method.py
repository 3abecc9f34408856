"""What ``kv_cache_dtype`` means for one model: a servable method, or its ``saw-int4`` recipe,
and the calibrated key means its ``-kc`` layers subtract (:func:`load_key_means`).

``saw-int4`` resolves, in order, to: the model's stored recipe (``sawkv calibrate``); a recipe
calibrated now, on first use, when the model has real weights (minutes on a CPU; stored for
next time); :data:`~sawkv.quant.recipe.SAW_INT4_FALLBACK` for presets without weights and
``load_format="dummy"`` (random weights have no key statistics to calibrate on).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from sawkv.cache.kv_cache import KVCacheSpec, parse_servable_method
from sawkv.config import ModelConfig
from sawkv.quant.methods import KVMethod, parse_method
from sawkv.quant.recipe import SAW_INT4_FALLBACK, Recipe, is_saw_int4

log = logging.getLogger(__name__)


def resolve_kv_method(
    name: str, model_name: str, model_config: ModelConfig, weights_dir: Path | None
) -> KVMethod | Recipe:
    """The method or recipe the engine stores for ``kv_cache_dtype=name``.

    Args:
        name: ``kv_cache_dtype`` as given.
        model_name: the engine's ``model`` (name or directory): selects the stored recipe.
        model_config: the model's shape (checked against the recipe).
        weights_dir: the HF directory the weights load from, or None for random weights.
    Raises:
        ValueError: an unservable method, or a recipe for another shape.
    """
    method = parse_servable_method(name, model_config.head_dim)
    if not is_saw_int4(method):
        return method
    if weights_dir is None:
        log.info("saw-int4 without weights (%s): using %s", model_name, SAW_INT4_FALLBACK)
        return parse_method(SAW_INT4_FALLBACK, model_config.head_dim)
    from sawkv.models.calibration import load_recipe

    recipe = load_recipe(model_name)
    if recipe is None:
        recipe = _calibrate(model_name, weights_dir)
    want = (model_config.num_layers, model_config.num_kv_heads, model_config.head_dim)
    have = (recipe.num_layers, recipe.num_kv_heads, recipe.head_dim)
    if have != want:
        raise ValueError(
            f"the saw-int4 recipe of {model_name!r} is for (layers, KV heads, head_dim) {have}, "
            f"the model has {want}: recalibrate with `sawkv calibrate --model {model_name}`"
        )
    return recipe


def _calibrate(model_name: str, weights_dir: Path) -> Recipe:
    """First use: build and store the recipe (loads the HF model in fp32 on the CPU)."""
    from sawkv.eval.calibrate import get_recipe
    from sawkv.models.hub import load_hf_model

    log.warning("no saw-int4 recipe for %s yet: calibrating it now (once)", model_name)
    model, tokenizer = load_hf_model(weights_dir)
    try:
        return get_recipe(model, tokenizer, model_name)
    finally:
        del model


def load_key_means(model_name: str, spec: KVCacheSpec) -> torch.Tensor | None:
    """Calibrated key means for ``-kc`` (``[num_layers, num_kv_heads, head_dim]``); zeros with a
    warning when none are available (e.g. dummy weights). A recipe brings its own."""
    if not spec.is_uniform:
        if spec.method.k_means is not None or not spec.method.center_k:
            return spec.method.k_means
        warnings.warn(f"recipe of {model_name!r} has no key means; -kc uses zeros", stacklevel=2)
        return torch.zeros(spec.num_layers, spec.num_kv_heads, spec.head_dim)
    if not spec.method.center_k:
        return None
    means = None
    try:
        from sawkv.models.calibration import load_key_means as _load

        means = _load(model_name)
    except (ImportError, FileNotFoundError, ValueError) as e:
        warnings.warn(f"no key means for {model_name!r} ({e}); -kc uses zeros", stacklevel=2)
    if means is None:
        warnings.warn(f"no calibrated key means for {model_name!r}; -kc uses zeros", stacklevel=2)
        return torch.zeros(spec.num_layers, spec.num_kv_heads, spec.head_dim)
    expect = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    if tuple(means.shape) != expect:
        raise ValueError(
            f"key means of {model_name!r} have shape {tuple(means.shape)}, need {expect}"
        )
    return means
