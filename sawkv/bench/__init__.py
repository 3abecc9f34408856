"""Serving benchmarks: a load generator for OpenAI-compatible servers and an offline engine run.

``sawkv bench serve`` drives any OpenAI-compatible server (sawkv, vLLM, SGLang) over HTTP;
``sawkv bench throughput`` runs the same workloads through :class:`sawkv.engine.LLMEngine` in
process. Both write rows of one schema (:mod:`sawkv.bench.metrics`) under ``{"runs": [...]}``.
"""
