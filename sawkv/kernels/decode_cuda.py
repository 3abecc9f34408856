"""CUDA paged decode over fragment-ordered INT4 / INT8 pages, compiled at first use.

The kernel (``csrc/paged_decode.cuh``) reads each 16-token group of a page with coalesced
16-byte loads straight into tensor-core operand registers (``page_layout.py``), so decode runs
at the memory roofline instead of being bound by unpacking instructions as the Triton kernel
is. It is built with ``torch.utils.cpp_extension`` for the current GPU's architecture into
``$SAWKV_EXT_DIR`` (default ``~/.cache/sawkv/torch_extensions``), keyed by a hash of the
sources, the way FlashInfer JIT-compiles its kernels. ``SAWKV_CUDA_DECODE=0`` turns it off; if
the build fails, :func:`available` says why and callers fall back to the Triton kernel.
``SAWKV_DECODE_CTA_WARPS=8`` runs it at 8 warps per CTA where that variant exists (head_dim
128; ``plan.py``), for a whole engine or server.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import torch

from sawkv.kernels.page_format import KVPages, PageFormat

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("paged_decode.cu", "paged_decode.cuh", "paged_decode_dispatch.cuh")
# one translation unit per (bits, head_dim, per-half key metadata): the build runs them in parallel
_VARIANTS = [(bits, d, kh) for bits in (4, 8) for d in (64, 128, 256) for kh in (False, True)]
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
_TICKETS: dict[int, list[torch.Tensor]] = {}


def _ext_dir() -> Path:
    root = os.environ.get("SAWKV_EXT_DIR") or Path.home() / ".cache" / "sawkv" / "torch_extensions"
    return Path(root)


def _build():
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        raise RuntimeError(f"needs compute capability >= 8.0 (mma.m16n8k16), got {major}.{minor}")
    digest = hashlib.sha1()
    for name in _SOURCES:
        digest.update((_CSRC / name).read_bytes())
    tag = f"sm{major}{minor}_{digest.hexdigest()[:12]}"
    build_dir = _ext_dir() / f"paged_decode_{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    units = []
    for bits, d, kh in _VARIANTS:
        unit = build_dir / f"variant_b{bits}_d{d}{'_kh' if kh else ''}.cu"
        flag = "true" if kh else "false"
        text = '#include "paged_decode_dispatch.cuh"\n'
        text += f"SAWKV_INSTANTIATE_DECODE({bits}, {d}, {flag})\n"
        if not unit.exists() or unit.read_text() != text:
            unit.write_text(text)
        units.append(str(unit))
    arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
    return load(
        name=f"sawkv_paged_decode_{tag}",
        sources=[str(_CSRC / "paged_decode.cu"), *units],
        extra_include_paths=[str(_CSRC)],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17", arch],
        build_directory=str(build_dir),
        verbose=os.environ.get("SAWKV_EXT_VERBOSE") == "1",
    )


def _module():
    with _LOCK:
        if "module" not in _STATE and "error" not in _STATE:
            try:
                _STATE["module"] = _build()
            except Exception as e:  # noqa: BLE001 - any build failure means "use the fallback"
                _STATE["error"] = f"{type(e).__name__}: {e}"
        return _STATE.get("module")


def available(device: torch.device | None = None) -> bool:
    """Whether the CUDA decode kernel can run here (builds it on the first call)."""
    if os.environ.get("SAWKV_CUDA_DECODE", "1") == "0" or not torch.cuda.is_available():
        return False
    if device is not None and torch.device(device).type != "cuda":
        return False
    return _module() is not None


def build_error() -> str | None:
    """Why the build failed, or None."""
    return _STATE.get("error")  # type: ignore[return-value]


def supports(q: torch.Tensor, fmt: PageFormat, num_q_heads: int) -> bool:
    """Formats, shapes and dtypes the CUDA kernel serves (others go to the Triton kernel):
    INT4/INT8 pages (one (scale, min) per key or per half-key, ``k_half_meta``), fp16/bf16 q,
    head_dim 64/128/256, at most 16 query heads per KV head."""
    return (
        fmt.bits in (4, 8)
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] in (64, 128, 256)
        and num_q_heads // fmt.num_kv_heads <= 16
    )


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    kept = _TICKETS.setdefault(idx, [])
    if not kept or kept[-1].numel() < n:
        # zeros once; every merging CTA resets its own ticket, so replays need no memset. Older
        # buffers stay alive: CUDA graphs captured with them still point at them.
        kept.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return kept[-1]


def paged_decode_cuda(
    q: torch.Tensor,
    pages: KVPages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    fmt: PageFormat,
    *,
    scale: float,
    sliding_window: int,
    num_splits: int,
    groups_per_step: int = 0,
    single_split_tokens: int = 0,
    cta_warps: int = 0,
    part_o: torch.Tensor | None = None,
    part_ml: torch.Tensor | None = None,
    first: int = 0,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention (one query per sequence) over fragment-ordered INT4/INT8 pages.

    Arguments as in :func:`sawkv.kernels.paged_attention_decode` (already checked there), plus
    ``num_splits`` (see :func:`sawkv.kernels.plan.pick_num_splits`), ``groups_per_step``
    (16-token groups a warp loads per step; 0 = the kernel's default), ``single_split_tokens``
    (a sequence whose span is at most this many tokens is decoded by one CTA, without the
    split merge; 0 = the default, 512), ``cta_warps`` (warps per CTA: 0 or 4, or 8 at
    head_dim 128 with one group per step) and the planned
    workspaces ``part_o [num_seqs, Hq, num_splits, d]`` / ``part_ml [..., 2]`` fp32 (allocated
    here if None). ``q`` fp16/bf16 ``[num_seqs, Hq, d]``; ``out`` the same shape and dtype.
    Positions below ``first`` are not attended; ``lse [num_seqs, Hq]`` fp32, if given, gets
    the natural log-sum-exp of the attended scaled scores (attention sinks merge with it).
    Returns ``out``.
    """
    mod = _module()
    if mod is None:
        raise RuntimeError(f"the CUDA decode kernel is unavailable: {build_error()}")
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = fmt.num_kv_heads
    if part_o is None or part_ml is None:
        if num_splits > 1:
            part_o = torch.empty(
                (num_seqs, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
            )
            part_ml = torch.empty(
                (num_seqs, num_q_heads, num_splits, 2), dtype=torch.float32, device=q.device
            )
        else:
            part_o = part_ml = torch.empty(0, dtype=torch.float32, device=q.device)
    k_cache, v_cache, k_meta, v_meta = pages
    tickets = _tickets(q.device, num_seqs * num_kv_heads)
    mod.paged_decode(
        q, out, k_cache, v_cache, k_meta, v_meta, block_tables, seq_lens, part_o, part_ml,
        tickets, fmt.bits, num_splits, scale * 1.4426950408889634, fmt.had_block,
        bool(fmt.rotate_v), sliding_window, groups_per_step, single_split_tokens or 512, first,
        lse if lse is not None else part_ml, lse is not None, bool(fmt.k_half_meta), cta_warps,
    )  # fmt: skip
    return out
