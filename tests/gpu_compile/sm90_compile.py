"""Compile Triton kernels for sm_90 ahead of time, without a GPU (run in a fresh process:
TRITON_INTERPRET must be unset when triton is imported). Prints one line per kernel variant;
exits non-zero on the first compile error."""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sawkv.kernels.cache_write import _cache_write_kernel
from sawkv.kernels.dequant import _dequant_kernel
from sawkv.kernels.write_groups import _NONE, _cache_write_groups_kernel

TARGET = GPUTarget("cuda", 90, 32)
WRITE_PTRS = {"k_ptr": "*bf16", "v_ptr": "*bf16", "k_page_ptr": "*u8", "v_page_ptr": "*u8",
              "k_meta_ptr": "*fp16", "v_meta_ptr": "*fp16", "k_perm_ptr": "*i32",
              "v_perm_ptr": "*i32", "slot_ptr": "*i64", "mean_ptr": "*fp32",
              "norm": "fp32"}  # fmt: skip
FP32_ROWS = {"k_ptr": "*fp32", "v_ptr": "*fp32"}
DEQUANT_PTRS = {"page_ptr": "*u8", "meta_ptr": "*fp16", "perm_ptr": "*i32", "bt_ptr": "*i32",
                "lens_ptr": "*i32", "start_ptr": "*i32", "out_ptr": "*fp16"}  # fmt: skip


def compile_one(fn, types: dict[str, str], consts: dict, num_warps: int = 4):
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps})


def main() -> None:
    for bits in (4, 8):
        for d in (64, 128, 256):
            # the 16-bit rotation for bf16 rows, tf32x3 for fp32 rows, none
            for had, rot_v, prec in ((0, False, "tf32x3"), (d, True, "tf32x3"),
                                     (d, True, "exact16")):  # fmt: skip
                ptrs = WRITE_PTRS if prec == "exact16" else {**WRITE_PTRS, **FP32_ROWS}
                base = dict(BLOCK_SIZE=16, D=d, BITS=bits, HAD=had, ROT_V=rot_v, HAS_MEAN=True,
                            PREC=prec)  # fmt: skip
                k = compile_one(_cache_write_groups_kernel, ptrs, {**base, "NONE": _NONE})
                print(f"write_groups bits={bits} d={d} had={had} {prec}: smem {k.metadata.shared}")
                k = compile_one(_cache_write_kernel, ptrs, {**base, "BLOCK_T": 32})
                print(f"cache_write bits={bits} d={d} had={had} {prec}: smem {k.metadata.shared}")
            k = compile_one(_dequant_kernel, DEQUANT_PTRS, dict(BLOCK_SIZE=16, D=d, BITS=bits))
            print(f"dequant bits={bits} d={d}: smem {k.metadata.shared}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
