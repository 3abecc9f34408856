"""Registers the baseline method families (evaluation-only) in the method-name registry.

``kivi{k}[-g{G}][-r{R}]`` (:mod:`sawkv.quant.kivi`), ``kmeans{b}[-d{s}][-bdr[{b}]]``
(:mod:`sawkv.quant.kmeans`), ``gptq{k}[-g{G}][-bdr[{b}]][-kc]`` (:mod:`sawkv.quant.hessian`),
``mixed{B}[-bdr{b}][-kv][-s{S}]`` (:mod:`sawkv.quant.mixed`). All are fake-quant methods with
``fake_quant_seq(x, *, is_key, layer_idx, k_mean=None)``, scored through
:class:`sawkv.eval.sim_cache.SimKVCache`.
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
