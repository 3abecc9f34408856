"""Model access: real pretrained models converted once from offline GGUF packages."""

from __future__ import annotations

from sawkv.models.hub import (
    KNOWN_MODELS,
    ModelNotInstalledError,
    cache_dir,
    load_hf_model,
    model_cache_dir,
    resolve_model_dir,
)

__all__ = [
    "KNOWN_MODELS",
    "ModelNotInstalledError",
    "cache_dir",
    "load_hf_model",
    "model_cache_dir",
    "resolve_model_dir",
]
