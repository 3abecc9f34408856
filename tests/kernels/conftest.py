"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter.

TRITON_INTERPRET must be set before any triton.jit function is defined, i.e. before the kernel
modules are imported; pytest imports this conftest before the test modules of this folder.
"""

from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
