"""Numerics of SAW-INT4 in pure torch (CPU and GPU): the oracle every kernel is tested against.

Servable methods only: the evaluation-only baselines register from :mod:`sawkv.eval`.
"""

from sawkv.quant.hadamard import block_hadamard_matrix, hadamard_matrix, rotate, rotate_matmul
from sawkv.quant.int4 import (
    dequantize_fp8,
    dequantize_int,
    pack_int4,
    quantize_fp8,
    quantize_int,
    unpack_int4,
)
from sawkv.quant.methods import Encoded, KVMethod, available_methods, parse_method, register_method
from sawkv.quant.protocol import SeqMethod
from sawkv.quant.recipe import DEFAULT_KV_METHOD, SAW_INT4, Recipe

__all__ = [
    "DEFAULT_KV_METHOD",
    "SAW_INT4",
    "Recipe",
    "SeqMethod",
    "Encoded",
    "KVMethod",
    "available_methods",
    "block_hadamard_matrix",
    "dequantize_fp8",
    "dequantize_int",
    "hadamard_matrix",
    "pack_int4",
    "parse_method",
    "quantize_fp8",
    "quantize_int",
    "register_method",
    "rotate",
    "rotate_matmul",
    "unpack_int4",
]
