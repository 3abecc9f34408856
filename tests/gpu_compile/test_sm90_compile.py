"""GPU-only code paths checked without a GPU: the Triton kernels the CPU tests run under the
interpreter must also compile for Hopper (sm_90, with the ptxas that ships in the triton
wheel). The interpreter accepts programs the compiler rejects (shapes, layouts, N-d permutes),
so this catches at CI time what would otherwise fail at the first GPU call."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def test_kernels_compile_for_sm90(tmp_path):
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas in this triton build")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, every run
    script = Path(__file__).with_name("sm90_compile.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    # 2 bits x 3 head dims x 3 rotations (none, tf32x3, exact16) per write kernel, and exact16
    # with per-half key metadata at d=128; 2 bits x 3 head dims dequant, and per half at d=128
    assert sum(line.startswith("write_groups") for line in lines) == 20
    assert sum(line.startswith("cache_write") for line in lines) == 20
    assert sum("k_half=True" in line for line in lines if line.startswith("cache_write")) == 2
    assert sum(line.startswith("dequant") for line in lines) == 8
    # 5 page formats (2 with per-half key metadata) x (single, split, split + log-sum-exp)
    # decode and 1 extend; 2 reduce per format without it (the reduce never reads pages)
    assert sum(line.startswith("decode ") for line in lines) == 15
    assert sum("k_half=True" in line for line in lines if line.startswith("decode ")) == 6
    assert sum(line.startswith("decode_reduce") for line in lines) == 6
    assert sum(line.startswith("extend") for line in lines) == 5
