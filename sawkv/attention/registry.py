"""Attention backends by name: ``"module:Class"`` strings imported on first use.

The contract (``backend.py``) never imports its implementations, so there is no import cycle
and CPU-only installs never import triton. Add a backend by adding a line here.
"""

from __future__ import annotations

import importlib

import torch

from sawkv.attention.backend import AttentionBackend

BACKENDS = {
    "torch": "sawkv.attention.torch_backend:TorchBackend",
    "triton": "sawkv.attention.triton_backend:TritonBackend",
}
# backends that run only on CUDA devices
_CUDA_ONLY = {"triton"}


def resolve_backend_name(name: str, device: torch.device) -> str:
    """``"auto"`` -> triton on CUDA, torch elsewhere; other names are checked and returned."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    if name in _CUDA_ONLY and device.type != "cuda":
        raise ValueError(f"the {name} attention backend needs a CUDA device, got {device}")
    return name


def backend_class(name: str) -> type[AttentionBackend]:
    """The class registered as ``name`` (imports its module on first use)."""
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    """A backend instance for ``device`` (``"auto"``, ``"torch"`` or ``"triton"``)."""
    return backend_class(resolve_backend_name(name, device))()
