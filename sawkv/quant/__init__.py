"""Numerics of SAW-INT4 in pure torch (CPU and GPU): the oracle every kernel is tested against."""

from sawkv.quant import baselines  # noqa: F401  registers the kivi/kmeans/gptq/mixed names
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

__all__ = [
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
