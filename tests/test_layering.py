"""Imports follow the layers (DESIGN.md), checked statically by parsing every module with ``ast``:

    quant -> kernels -> cache -> attention -> models -> engine -> distributed / server, eval on top

A module may import its own layer and the layers below it, never one above. Kernels are leaves
(nothing of sawkv but ``sawkv.kernels``), and the serving path never loads ``sawkv.eval`` or the
evaluation-only quantization baselines when its modules are imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "sawkv"

# rank of each top-level part of the package; equal ranks may import each other
LAYERS = {
    "defaults": 0,
    "config": 0,
    "quant": 0,
    "kernels": 1,
    "cache": 2,
    "attention": 3,
    "models": 4,
    "hf": 4,  # the transformers Cache: quant + models (calibration files, hub)
    "engine": 5,
    "distributed": 6,
    "server": 6,
    "eval": 7,
    "bench": 7,
    "cli": 8,
    "": 8,  # sawkv/__init__.py: the public facade
}

# Upward imports that are deliberate, each inside a function (never at import time) and why.
ALLOWED_UPWARD = {
    # saw-int4 without a stored recipe calibrates one on first use, with the eval calibrator
    ("sawkv.engine.kv_method", "sawkv.eval.calibrate"),
    ("sawkv.hf.cache", "sawkv.eval.calibrate"),
    # tensor_parallel_size > 1 starts the worker processes
    ("sawkv.engine.llm_engine", "sawkv.distributed.launch"),
}

SERVING = ("sawkv.server", "sawkv.engine", "sawkv.distributed")
EVAL_ONLY = (
    "sawkv.eval",
    "sawkv.quant.kivi",
    "sawkv.quant.kmeans",
    "sawkv.quant.hessian",
    "sawkv.quant.mixed",
)


def _module_name(path: Path) -> str:
    parts = ("sawkv", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported sawkv module, at module level)`` of every import statement in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = set(map(id, tree.body))
    for node in tree.body:  # imports under module-level if/try still run at import time
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            # "from sawkv.pkg import sub" may name a submodule
            names += [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "sawkv" or name.startswith("sawkv."):
                out.append((name, id(node) in top_level))
    return out


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
IMPORTS = {m: _imports(p) for m, p in MODULES.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _existing(name: str) -> str | None:
    """The module ``name`` refers to, or None (an attribute of a module, not a module)."""
    return name if name in MODULES else None


def test_every_part_has_a_layer():
    assert {_part(m) for m in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_imports(module):
    rank = LAYERS[_part(module)]
    bad = []
    for name, _ in IMPORTS[module]:
        target = _existing(name)
        if target is None or (module, target) in ALLOWED_UPWARD:
            continue
        if LAYERS[_part(target)] > rank:
            bad.append(target)
    assert not bad, f"{module} (layer {_part(module)!r}) imports higher layers: {bad}"


@pytest.mark.parametrize("module", [m for m in MODULES if _part(m) == "kernels"])
def test_kernels_are_leaves(module):
    others = [n for n, _ in IMPORTS[module] if _part(n) != "kernels"]
    assert not others, f"{module} imports {others}"


def _import_closure(start: str) -> set[str]:
    """Modules executed by ``import start``: module-level imports, transitively, plus the
    parent packages Python runs first."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen or m not in MODULES:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += [n for n, top in IMPORTS[m] if top]
    return seen


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith(SERVING)])
def test_serving_never_loads_evaluation_code(module):
    loaded = _import_closure(module)
    bad = sorted(m for m in loaded if m.startswith(EVAL_ONLY))
    assert not bad, f"importing {module} loads evaluation-only modules {bad}"


def test_the_scan_sees_imports():
    """The scanner itself: it finds a known module-level import and a known lazy one."""
    assert ("sawkv.attention.backend", False) not in IMPORTS["sawkv.cache.kv_cache"]
    assert ("sawkv.cache.kv_cache", True) in IMPORTS["sawkv.attention.backend"]
    assert ("sawkv.eval.calibrate", False) in IMPORTS["sawkv.engine.kv_method"]
    assert "sawkv.cache.kv_cache" in _import_closure("sawkv.engine.model_runner")
