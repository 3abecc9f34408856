"""Triton's compiler rejects a ``@triton.jit`` function that reads a plain module-level number
(``LN2 = 0.693``): globals must be ``tl.constexpr``. The CPU interpreter accepts them, so a
kernel can pass every interpreter test and fail at its first GPU launch (the decode kernel's
log-sum-exp did, on the attention-sink path). This scans every jit function of the package."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil

import pytest

pytest.importorskip("triton")


def _jit_functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(
            "jit" in ast.unparse(d) for d in node.decorator_list
        ):
            yield node


def plain_number_globals(module) -> list[str]:
    """``function.NAME`` for each module-level int/float (not a constexpr) read in a jit fn."""
    source = importlib.util.find_spec(module.__name__).origin
    tree = ast.parse(open(source, encoding="utf-8").read())
    bad = []
    for fn in _jit_functions(tree):
        local = {a.arg for a in fn.args.args} | {
            t.id for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Name)
        }  # fmt: skip
        for n in ast.walk(fn):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in local:
                v = getattr(module, n.id, None)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    bad.append(f"{fn.name}.{n.id}")
    return bad


def test_scan_flags_a_plain_number_global(tmp_path, monkeypatch):
    src = tmp_path / "fake_kernels.py"
    src.write_text(
        "import triton\nimport triton.language as tl\nLN2 = 0.69\nOK = tl.constexpr(2)\n"
        "@triton.jit\ndef f(x):\n    y = x * LN2\n    return y * OK\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert plain_number_globals(importlib.import_module("fake_kernels")) == ["f.LN2"]


def test_jit_functions_read_only_constexpr_globals():
    import sawkv.kernels.cache_write  # noqa: F401  (import order: write_groups needs it first)

    bad = []
    for info in pkgutil.walk_packages(sawkv.__path__, "sawkv."):
        spec = importlib.util.find_spec(info.name)
        if spec.origin is None or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as f:
            if "triton.jit" not in f.read():
                continue
        bad += [
            f"{info.name}:{x}" for x in plain_number_globals(importlib.import_module(info.name))
        ]
    assert not bad, f"jit functions read non-constexpr globals: {bad}"
