"""sawkv: a practical 4-bit KV cache (SAW-INT4) for LLM serving.

Heavy submodules (engine, server, hf) are imported lazily so ``import sawkv`` stays cheap and
works where optional packages (fastapi, openai) are missing.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "parse_method", "__version__"]


def __getattr__(name: str):
    if name == "parse_method":
        from sawkv.quant.methods import parse_method

        return parse_method
    if name in ("LLM", "SamplingParams"):
        from sawkv.engine import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'sawkv' has no attribute {name!r}")
