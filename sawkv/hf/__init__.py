"""Drop-in transformers cache that stores K/V quantized by a sawkv method (INT4 + BDR ...)."""

from sawkv.hf.cache import SawKVCache, SawKVLayer, attention_shape

__all__ = ["SawKVCache", "SawKVLayer", "attention_shape"]
