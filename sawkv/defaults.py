"""Defaults shared by the library, the CLI and the server (no imports: ``sawkv --help`` stays fast).

``DEFAULT_KV_METHOD`` is the one default KV cache method of ``generate``, ``serve``, ``LLM``,
``SawKVCache``, the README and the demo: ``saw-int4``, the model's calibrated per-layer recipe
(:mod:`sawkv.quant.recipe`). ``auto`` (full precision) stays available everywhere.
"""

DEFAULT_KV_METHOD = "saw-int4"
