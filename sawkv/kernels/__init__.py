"""Fused Triton kernels over the paged INT4/INT8/float KV cache (leaves: torch and triton only).

* :class:`PageFormat` / :class:`KVPages` (``page_format.py``): how one layer's pages store K/V,
  and its four tensors. Every launcher takes ``(q, pages, ..., fmt)`` and keyword options.
* :func:`cache_write` (``cache_write.py``): center, rotate, quantize, pack and scatter new K/V.
* :func:`paged_attention_decode` / :func:`paged_attention_extend` (``decode.py``, ``extend.py``;
  shared tiles in ``tiles.py``; CUDA decode in ``decode_cuda.py``; page byte order in
  ``page_layout.py``), planned once per step by :func:`plan_decode` / :func:`plan_extend`
  (``plan.py``; host-side launch helpers in ``launch.py``).

The kernel modules are imported lazily so that ``sawkv.kernels.checks`` (used by the torch
reference on CPU) does not import triton, and so that tests can set ``TRITON_INTERPRET=1`` first.
Import the launchers from this package (``from sawkv.kernels import cache_write``), not from the
submodules, whose ``cache_write`` name would otherwise shadow the function.
"""

from __future__ import annotations

import importlib

from sawkv.kernels.page_format import KVPages, PageFormat

_LAZY = {
    "cache_write": "sawkv.kernels.cache_write",
    "paged_attention_decode": "sawkv.kernels.decode",
    "paged_attention_extend": "sawkv.kernels.extend",
    "plan_decode": "sawkv.kernels.plan",
    "plan_extend": "sawkv.kernels.plan",
    "DecodePlan": "sawkv.kernels.plan",
    "ExtendPlan": "sawkv.kernels.plan",
}

__all__ = ["KVPages", "PageFormat", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        fn = getattr(importlib.import_module(_LAZY[name]), name)
        # importing sawkv.kernels.cache_write binds the *module* to this package's attribute of
        # the same name; rebind the function so `from sawkv.kernels import cache_write` works.
        globals()[name] = fn
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
