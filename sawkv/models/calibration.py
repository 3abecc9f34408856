"""A model's stored calibration (key means, ``saw-int4`` recipe): where it lives, how it loads.

Both live in the model's cache directory (:func:`sawkv.models.hub.model_cache_dir`)::

    <cache>/<model>/k_means.safetensors          key means of the -kc methods
    <cache>/<model>/saw_int4_recipe.safetensors  the saw-int4 recipe (its own key means inside)

Loading only: no evaluation code is imported, so the engine and the server can read them.
Building them (``sawkv calibrate``, or first use) is :mod:`sawkv.eval.calibrate`'s job.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sawkv.quant.recipe import RECIPE_FILE, Recipe

KEY_MEANS_FILE = "k_means.safetensors"


def model_key(name_or_path: str | os.PathLike) -> str:
    """The name a model's artifacts are filed under: a known name for itself *and* for its
    converted directory (``~/.cache/sawkv/models/<name>``), else the path as given."""
    from sawkv.models.hub import KNOWN_MODELS, cache_dir

    key = str(name_or_path)
    if key in KNOWN_MODELS:
        return key
    path = Path(key).expanduser()
    try:
        models = (cache_dir() / "models").resolve()
        if path.resolve().parent == models and path.name in KNOWN_MODELS:
            return path.name
    except OSError:
        pass
    return key


def key_means_path(model_name: str) -> Path:
    """Where the key means of ``model_name`` live (inside its sawkv cache directory)."""
    from sawkv.models.hub import model_cache_dir

    return Path(model_cache_dir(model_key(model_name))) / KEY_MEANS_FILE


def recipe_path(model_name: str) -> Path:
    """Where the ``saw-int4`` recipe of ``model_name`` lives."""
    from sawkv.models.hub import model_cache_dir

    return Path(model_cache_dir(model_key(model_name))) / RECIPE_FILE


def load_key_means(model_name: str) -> torch.Tensor | None:
    """Stored key means ``[num_layers, num_kv_heads, head_dim]`` of ``model_name``, or None."""
    from safetensors.torch import load_file

    try:
        path = key_means_path(model_name)
    except (ValueError, OSError):
        return None
    if not path.is_file():
        return None
    return load_file(str(path))["k_means"]


def load_recipe(model_name: str) -> Recipe | None:
    """The stored ``saw-int4`` recipe of ``model_name``, or None if it was never calibrated."""
    try:
        path = recipe_path(model_name)
    except (ValueError, OSError):
        return None
    return Recipe.load(path) if path.is_file() else None
