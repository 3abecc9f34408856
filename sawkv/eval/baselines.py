"""Registers the evaluation-only baseline method families in the method-name registry.

``kivi{k}[-g{G}][-r{R}]`` (:mod:`sawkv.quant.kivi`), ``kmeans{b}[-d{s}][-bdr[{b}]]``
(:mod:`sawkv.quant.kmeans`), ``gptq{k}[-g{G}][-bdr[{b}]][-kc]`` (:mod:`sawkv.quant.hessian`),
``mixed{B}[-bdr{b}][-kv][-s{S}]`` (:mod:`sawkv.quant.mixed`). All are fake-quant methods of the
:class:`sawkv.quant.protocol.SeqMethod` protocol, scored through
:class:`sawkv.eval.sim_cache.SimKVCache`.

Importing :mod:`sawkv.eval` runs this module. The serving stack (``sawkv.quant``, the engine,
the server) never imports it, so a server process neither loads these modules nor accepts
these names (the engine could not serve them anyway).
"""

from __future__ import annotations

from sawkv.quant.hessian import parse_gptq
from sawkv.quant.kivi import parse_kivi
from sawkv.quant.kmeans import parse_kmeans
from sawkv.quant.methods import register_method
from sawkv.quant.mixed import parse_mixed

BASELINE_FAMILIES = {
    "kivi": parse_kivi,
    "kmeans": parse_kmeans,
    "gptq": parse_gptq,
    "mixed": parse_mixed,
}

for _prefix, _factory in BASELINE_FAMILIES.items():
    register_method(_prefix, _factory)
