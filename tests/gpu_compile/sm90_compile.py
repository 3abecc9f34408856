"""Compile Triton kernels for sm_90 ahead of time, without a GPU (run in a fresh process:
TRITON_INTERPRET must be unset when triton is imported). Prints one line per kernel variant;
exits non-zero on the first compile error."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sawkv.kernels.cache_write import _cache_write_kernel
from sawkv.kernels.decode import _decode_kernel, _decode_reduce_kernel
from sawkv.kernels.dequant import _dequant_kernel
from sawkv.kernels.extend import _extend_kernel
from sawkv.kernels.launch import DECODE_CONFIG, DECODE_CONFIG_D256, EXTEND_CONFIG, _dot_code
from sawkv.kernels.rotation import _rotate_cast_kernel
from sawkv.kernels.write_groups import _NONE, _cache_write_groups_kernel

TARGET = GPUTarget("cuda", 90, 32)
WRITE_PTRS = {"k_ptr": "*bf16", "v_ptr": "*bf16", "k_page_ptr": "*u8", "v_page_ptr": "*u8",
              "k_meta_ptr": "*fp16", "v_meta_ptr": "*fp16", "k_perm_ptr": "*i32",
              "v_perm_ptr": "*i32", "slot_ptr": "*i64", "mean_ptr": "*fp32",
              "norm": "fp32"}  # fmt: skip
FP32_ROWS = {"k_ptr": "*fp32", "v_ptr": "*fp32"}
# (bits, head_dim, had_block, rotate_v, k_half_meta): INT4 with K+V rotation, INT8 without,
# bf16 pages; INT4 and INT8 with keys scaled per half
ATTN_CASES = ((4, 128, 128, True, False), (8, 64, 0, False, False), (16, 256, 0, False, False),
              (4, 128, 128, True, True), (8, 64, 0, False, True))  # fmt: skip
DEQUANT_PTRS = {"page_ptr": "*u8", "meta_ptr": "*fp16", "perm_ptr": "*i32", "bt_ptr": "*i32",
                "lens_ptr": "*i32", "start_ptr": "*i32", "out_ptr": "*fp16"}  # fmt: skip


def compile_one(fn, types: dict[str, str], consts: dict, num_warps: int = 4):
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps})


def jobs() -> list[tuple[str, object, dict, dict, int]]:
    """Every variant as (label, kernel, pointer types, constexprs, num_warps)."""
    out = []
    for bits in (4, 8):
        for d in (64, 128, 256):
            # the 16-bit rotation for bf16 rows, tf32x3 for fp32 rows, none
            for had, rot_v, prec in ((0, False, "tf32x3"), (d, True, "tf32x3"),
                                     (d, True, "exact16")):  # fmt: skip
                ptrs = WRITE_PTRS if prec == "exact16" else {**WRITE_PTRS, **FP32_ROWS}
                # keys with one (scale, min) per half: once per bits
                for k_half in (False, True) if prec == "exact16" and d == 128 else (False,):
                    base = dict(BLOCK_SIZE=16, D=d, BITS=bits, HAD=had, ROT_V=rot_v,
                                HAS_MEAN=True, PREC=prec, K_HALF=k_half)  # fmt: skip
                    tag = f"bits={bits} d={d} had={had} {prec} k_half={k_half}"
                    out.append((f"write_groups {tag}", _cache_write_groups_kernel, ptrs,
                                {**base, "NONE": _NONE}, 4))  # fmt: skip
                    out.append((f"cache_write {tag}", _cache_write_kernel, ptrs,
                                {**base, "BLOCK_T": 32}, 4))  # fmt: skip
            for half in (False, True) if d == 128 else (False,):
                consts = dict(BLOCK_SIZE=16, D=d, BITS=bits, HALF=half)
                out.append((f"dequant bits={bits} d={d} half={half}", _dequant_kernel,
                            DEQUANT_PTRS, consts, 4))  # fmt: skip
    for bits, d, had, rot_v, k_half in ATTN_CASES:
        page = "*bf16" if bits == 16 else "*u8"
        ptrs = {"q_ptr": "*bf16", "k_page_ptr": page, "v_page_ptr": page, "k_meta_ptr": "*fp16",
                "v_meta_ptr": "*fp16", "k_perm_ptr": "*i32", "v_perm_ptr": "*i32",
                "bt_ptr": "*i32", "lens_ptr": "*i32", "qsl_ptr": "*i32", "out_ptr": "*bf16",
                "part_o_ptr": "*fp32", "part_ml_ptr": "*fp32", "lse_ptr": "*fp32",
                "norm": "fp32", "qscale": "fp32"}  # fmt: skip
        dot = _dot_code(torch.bfloat16, bits)
        common = dict(G=4, D=d, HAD=had, ROT_V=rot_v)
        cfg = DECODE_CONFIG if d <= 128 else DECODE_CONFIG_D256
        # WRITE_LSE: attention sinks merge the decode's log-sum-exp (the path that once read a
        # non-constexpr global and failed only on the GPU)
        for single, write_lse in ((True, False), (False, False), (False, True)):
            consts = dict(common, G_PAD=16, BLOCK_SIZE=16, BITS=bits, BLOCK_N=cfg.block_n,
                          NUM_SPLITS=1 if single else 4, SINGLE=single, DOT=dot,
                          INTERPRET=False, TRANS_QK=False, WRITE_LSE=write_lse,
                          K_HALF=k_half)  # fmt: skip
            tag = f"bits={bits} d={d} k_half={k_half} single={single} lse={write_lse}"
            out.append((f"decode {tag}", _decode_kernel, ptrs, consts, cfg.num_warps))
        if not k_half:  # the reduce kernel never reads pages
            for write_lse in (False, True):
                consts = dict(common, G_PAD=16, NUM_SPLITS=4, SPLITS_PAD=4, WRITE_LSE=write_lse)
                out.append((f"decode_reduce bits={bits} d={d} lse={write_lse}",
                            _decode_reduce_kernel, ptrs, consts, 4))  # fmt: skip
        consts = dict(common, G_PAD=4, BLOCK_SIZE=16, BITS=bits, BLOCK_N=EXTEND_CONFIG.block_n,
                      BLOCK_R=EXTEND_CONFIG.block_r, DOT=dot, INTERPRET=False,
                      TRANS_QK=False, K_HALF=k_half)  # fmt: skip
        out.append((f"extend bits={bits} d={d} k_half={k_half}", _extend_kernel, ptrs, consts,
                     EXTEND_CONFIG.num_warps))  # fmt: skip
    # the SDPA extend path's query rotation (bf16 q -> fp16), output rotation (fp16 -> bf16),
    # cast only, a key mean, centered sink keys (fp32 -> fp16)
    for x, o, d, had in (("*bf16", "*fp16", 128, 128), ("*fp16", "*bf16", 128, 64),
                         ("*bf16", "*fp16", 256, 0), ("*fp32", "*fp32", 64, 64),
                         ("*fp32", "*fp16", 128, 128)):  # fmt: skip
        prec = "ieee" if x == "*fp32" else "exact16"
        consts = dict(D=d, HAD=had, PREC=prec, CLAMP16=o == "*fp16", BLOCK_ROWS=16)
        out.append((f"rotate_cast {x}->{o} d={d} had={had}", _rotate_cast_kernel,
                    {"x_ptr": x, "out_ptr": o, "norm": "fp32"}, consts, 4))  # fmt: skip
    return out


JOBS = jobs()


def run(i: int) -> str:
    label, fn, types, consts, num_warps = JOBS[i]
    return f"{label}: smem {compile_one(fn, types, consts, num_warps).metadata.shared}"


def main() -> None:
    # one process per core (forked after the imports): the compiles are independent, and the
    # whole set takes ~4 min on one core of a CI machine
    workers = max(1, min(len(JOBS), len(os.sched_getaffinity(0))))
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        for line in pool.map(run, range(len(JOBS))):  # in order; raises on the first error
            print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
