"""Host side of the Triton launchers: tile configs, product dtypes, device facts, small tables.

Nothing here launches a kernel; ``decode.py``, ``extend.py``, ``dequant.py`` and
``cache_write.py`` use these helpers, and ``plan.py`` builds the per-step plans from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sawkv.kernels.page_format import PageFormat
from sawkv.kernels.page_layout import group_perm


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch knobs. ``block_n`` KV tokens per tile; ``num_splits`` (decode) 0 =
    pick from the SM count; ``block_r`` query rows (token x head) per extend program;
    ``trans_qk`` computes the scores as ``K q^T`` (K the tensor-core A operand); ``maxnreg``
    caps registers per thread (None: the launcher's choice)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int = 0
    block_r: int = 64
    trans_qk: bool = False
    maxnreg: int | None = None
    # decode only: "auto" takes the CUDA kernel for INT4/INT8 pages when it builds, "triton"
    # forces this module's kernel; groups_per_step, single_split_tokens (spans up to this
    # many tokens take one CTA) and cta_warps (4, or 8 at head_dim 128) tune the CUDA kernel
    # (0 = its defaults)
    impl: str = "auto"
    groups_per_step: int = 0
    single_split_tokens: int = 0
    cta_warps: int = 0


# Measured on the H100 (benchmarks/bench_kernels.py --sweep / --sweep-occupancy, Qwen3-8B shape):
# 256-token tiles over 8 warps with registers capped at 128 (2 programs = 16 warps per SM) had
# the best geometric mean over B=1/32/256; 128-token tiles over 4 warps were within 5% at B=256
# but 15-20% slower at B=1 and B=32. d=256 keeps 128-token tiles and no cap (more live state).
DECODE_CONFIG = KernelConfig(block_n=256, num_warps=8, num_stages=3)
DECODE_CONFIG_D256 = KernelConfig(block_n=128, num_warps=8, num_stages=2)
EXTEND_CONFIG = KernelConfig(block_n=64, num_warps=4, num_stages=2, block_r=64)


_DOT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dot_code(q_dtype: torch.dtype, bits: int) -> int:
    """Product dtype: the page dtype for float pages; fp16 for codes (exact integers < 2048,
    the cheap magic-number conversion, and 3 more mantissa bits than bf16 for the query),
    unless q is fp32, which keeps fp32 products."""
    if bits == 16 or q_dtype == torch.float32:
        return _DOT_CODES[q_dtype]
    return 1


_SM_COUNT: dict[int, int] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _common_checks(q, fmt: PageFormat, block_tables, config):
    """What the Triton kernels need beyond :func:`sawkv.kernels.checks.check_step_inputs`."""
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"paged attention needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}"
        )
    if fmt.head_dim not in (64, 128, 256):
        raise ValueError(
            f"head_dim must be 64, 128 or 256 for the Triton kernels, got {fmt.head_dim}"
        )
    if q.stride(-1) != 1:
        raise ValueError(f"q must be contiguous in its last dim, got strides {q.stride()}")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables must be contiguous in its last dim")
    if fmt.bits == 16 and fmt.dtype != q.dtype:
        raise ValueError(f"float pages ({fmt.dtype}) must have q's dtype ({q.dtype})")
    bn = config.block_n
    if bn < 16 or bn & (bn - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {bn}")


def _launch_extra(config: KernelConfig, head_dim: int) -> dict:
    """Register cap for the decode kernel (not understood by the interpreter)."""
    if _interpreting():
        return {}
    cap = config.maxnreg if config.maxnreg is not None else (128 if head_dim <= 128 else None)
    return {} if cap is None else {"maxnreg": cap}


def _meta_args(pages):
    """(k_meta, v_meta, meta strides) for a launch; the page tensors stand in for bits=16.
    The strides are v_meta's: k_meta's offsets are derived from them (``tiles._k_meta_rows``;
    the same with one (scale, min) per key)."""
    k_cache, v_cache, k_meta, v_meta = pages
    if k_meta is None:
        return k_cache, v_cache, (0, 0, 0)
    return k_meta, v_meta, v_meta.stride()[:3]


_PERMS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _perm_args(bits: int, head_dim: int, device: torch.device):
    """The K and V byte-order tables of fragment-ordered pages (dummies for float pages)."""
    key = (bits if bits < 16 else 16, head_dim, str(device))
    if key not in _PERMS:
        if bits == 16:
            dummy = torch.zeros(1, dtype=torch.int32, device=device)
            _PERMS[key] = (dummy, dummy)
        else:
            _PERMS[key] = (
                group_perm(bits, head_dim, True, device),
                group_perm(bits, head_dim, False, device),
            )
    return _PERMS[key]
