"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter.

``triton.jit`` decides at decoration time whether a function is interpreted, and that includes
Triton's own library (``tl.sum``, ``tl.max``...), so TRITON_INTERPRET must be set before triton
itself is imported. pytest imports this conftest before the test modules of this folder, but
test modules collected earlier may already have imported triton (or the kernels) in compiled
mode; then the pure-Python triton modules and our kernel modules are dropped and imported again
in interpreter mode (the compiled extension ``triton._C`` is kept: it does not depend on it).
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ["TRITON_INTERPRET"] = "1"


def _reimport_interpreted() -> None:
    stale = [
        name
        for name in sys.modules
        if (name == "triton" or name.startswith("triton."))
        and not name.startswith("triton._C")
        or name
        in (
            "sawkv.kernels.cache_write",
            "sawkv.kernels.write_groups",
            "sawkv.kernels.decode",
            "sawkv.kernels.extend",
            "sawkv.kernels.tiles",
            "sawkv.kernels.dequant",
            "sawkv.kernels.rotation",
        )
    ]
    for name in stale:
        del sys.modules[name]
    package = sys.modules.get("sawkv.kernels")
    if package is not None:
        for attr in ("cache_write", "paged_attention_decode", "paged_attention_extend", "decode",
                     "extend", "tiles", "rotation", "dequant", "write_groups"):  # fmt: skip
            package.__dict__.pop(attr, None)


if "triton.language" in sys.modules:
    from triton.language import standard as _standard
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted

    if not isinstance(_standard.sum, _Interpreted):  # imported in compiled mode
        _reimport_interpreted()

triton = pytest.importorskip("triton")
