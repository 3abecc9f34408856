"""Per-step plans of the paged-attention launchers: the host work every layer would repeat.

A step's layers share the query shape, the block tables and the lengths; layers of one
:class:`PageFormat` also share which kernel runs, the split count and the workspaces. A plan
holds those decisions, made once (argument checks, the split heuristic, workspace allocation,
host copies of the lengths), so a planned launch only launches::

    plan = plan_decode(q, block_tables, seq_lens, fmt)          # once per step and format
    for layer in layers:
        paged_attention_decode(q, layer.pages, block_tables, seq_lens, fmt, scale=s, plan=plan)

The split heuristics of both decode kernels live here (:func:`pick_num_splits`). A plan made
before a CUDA graph is captured is captured with it: its workspaces must then live as long as
the graph (the caller keeps the plan).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sawkv.kernels.checks import check_query_start_loc, check_step_inputs
from sawkv.kernels.launch import (
    DECODE_CONFIG,
    DECODE_CONFIG_D256,
    EXTEND_CONFIG,
    KernelConfig,
    _common_checks,
    _interpreting,
    _sm_count,
)
from sawkv.kernels.page_format import PageFormat

if TYPE_CHECKING:  # dequant.py imports triton; plans must not
    from sawkv.kernels.dequant import SdpaPlan

# CTAs per SM the CUDA decode kernel's split count aims for. Up to 4 fit (3 at d=256), but
# every CTA pays a prologue (query rotation) and, with splits, a merge: on an H100 the split
# counts that fill ~2 CTAs per SM were the fastest of a forced-split sweep at every measured
# shape (benchmarks/results/kernels_latency_h100.json, cuda_sweep): 1 x 32K 32 splits 32.2 us
# against 36.4 at the 64 that 4 per SM picks; 8 x 32K 4 splits 122.3 against 124.4 at 8;
# 32 x 8K 1 split 119.1 against 123.3 at 2; 256 x 2K 1 split at both.
_TARGET_CTAS_PER_SM = 2
MAX_SPLITS = 64


@dataclass
class DecodePlan:
    """Decisions for decode launches over pages of ``fmt`` with one query shape.

    ``impl`` "cuda" (``decode_cuda.py``) or "triton" (``decode.py``); ``num_splits`` ranges
    per sequence; ``part_o [num_seqs, num_q_heads, num_splits, head_dim]`` and ``part_ml
    [num_seqs, num_q_heads, num_splits, 2]`` fp32 partial softmax states, None where the kernel
    writes ``out`` directly (one split; empty placeholders for the CUDA kernel). ``lse
    [num_seqs, num_q_heads]`` fp32, allocated by the first launch with attention sinks.
    """

    fmt: PageFormat
    num_seqs: int
    num_q_heads: int
    impl: str
    num_splits: int
    config: KernelConfig
    part_o: torch.Tensor | None
    part_ml: torch.Tensor | None
    lse: torch.Tensor | None = None


@dataclass
class ExtendPlan:
    """Decisions for extend launches over pages of ``fmt`` with one query shape.

    ``impl`` "sdpa" (dequantize once, FlashAttention; ``dequant.py``) or "triton" (the fused
    paged kernel). ``max_query_len`` sizes the Triton grid; ``rotated`` ``[num_tokens,
    num_q_heads, head_dim]`` fp32 holds the Triton kernel's un-rotated output when values are
    stored rotated. ``sdpa`` is :class:`sawkv.kernels.dequant.SdpaPlan` for the SDPA path.
    """

    fmt: PageFormat
    num_seqs: int
    num_tokens: int
    impl: str
    config: KernelConfig
    max_query_len: int
    rotated: torch.Tensor | None = None
    sdpa: SdpaPlan | None = None


# ---- decode -----------------------------------------------------------------------------------
def pick_num_splits(
    impl: str, config: KernelConfig, num_seqs: int, fmt: PageFormat, max_tokens: int, sms: int
) -> int:
    """Splits per sequence for decode, from the block-table width (``max_tokens``), never from
    ``seq_lens``: no host sync, and fixed per CUDA graph. ``config.num_splits > 0`` wins."""
    if config.num_splits > 0:
        return config.num_splits
    if impl == "cuda":
        return _cuda_splits(num_seqs, fmt.num_kv_heads, max_tokens, fmt.head_dim, sms)
    return _triton_splits(config, num_seqs, fmt.num_kv_heads, max_tokens, sms)


def _triton_splits(config, num_seqs, num_kv_heads, max_tokens, sms) -> int:
    """Triton kernel: ~2 waves of programs, every split >= 4 tiles, rounded down to a power of
    two (NUM_SPLITS is a compile-time constant: powers of two keep the variants few enough to
    compile while the decode CUDA graphs are captured)."""
    programs = max(1, num_seqs * num_kv_heads)
    want = -(-2 * sms // programs)
    most = max(1, max_tokens // (4 * config.block_n))
    splits = max(1, min(want, most, 64))
    return 1 << (splits.bit_length() - 1)


def _cuda_splits(num_seqs, num_kv_heads, max_tokens, head_dim, sms) -> int:
    """CUDA kernel: the fewest splits that fill whole waves of ``_TARGET_CTAS_PER_SM`` CTAs per
    SM best, with at least 128 tokens (two 16-token groups per warp) per split."""
    programs = max(1, num_seqs * num_kv_heads)
    slots = sms * _TARGET_CTAS_PER_SM
    most = max(1, min(MAX_SPLITS, max_tokens // 128))
    best, best_eff = 1, 0.0
    for splits in range(1, most + 1):
        ctas = programs * splits
        waves = -(-ctas // slots)
        eff = ctas / (waves * slots)
        if eff > best_eff + 0.02:
            best, best_eff = splits, eff
        if eff >= 0.95:
            break
    return best


CTA_WARPS_ENV = "SAWKV_DECODE_CTA_WARPS"


def _with_env_cta_warps(config: KernelConfig, fmt: PageFormat) -> KernelConfig:
    """``$SAWKV_DECODE_CTA_WARPS`` (4 or 8) as the CUDA decode's warps per CTA where the config
    leaves them at the default (0) and the kernel has that variant (8: head_dim 128, one group
    per warp step); elsewhere the config as given. Lets a whole engine or server run try the
    8-warp kernel (e.g. at c=1) without a code change."""
    raw = os.environ.get(CTA_WARPS_ENV, "").strip()
    if not raw or config.cta_warps:
        return config
    if raw not in ("0", "4", "8"):
        raise ValueError(f"${CTA_WARPS_ENV} must be 0, 4 or 8, got {raw!r}")
    warps = int(raw)
    if warps == 8 and (fmt.head_dim != 128 or config.groups_per_step not in (0, 1)):
        return config
    return dataclasses.replace(config, cta_warps=warps)


def _use_cuda(q, fmt: PageFormat, num_q_heads: int, impl: str) -> bool:
    if q.device.type != "cuda" or _interpreting():
        if impl == "cuda":
            raise ValueError("config.impl='cuda' needs CUDA tensors")
        return False
    from sawkv.kernels import decode_cuda

    ok = decode_cuda.supports(q, fmt, num_q_heads)
    if impl == "cuda" and not ok:
        raise ValueError(
            "the CUDA decode kernel serves INT4/INT8 pages, fp16/bf16 q, head_dim 64/128/256 "
            "and G <= 16"
        )
    if ok and not decode_cuda.available(q.device):
        if impl == "cuda":
            raise RuntimeError(f"the CUDA decode kernel did not build: {decode_cuda.build_error()}")
        return False
    return ok


def plan_decode(
    q: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    fmt: PageFormat,
    *,
    sliding_window: int = 0,
    config: KernelConfig | None = None,
) -> DecodePlan:
    """Check the step's decode inputs and decide kernel, splits and workspaces.

    Args:
        q: ``[num_seqs, num_q_heads, head_dim]`` (only its shape, dtype and device are used).
        block_tables: ``[num_seqs, max_blocks]`` int32; its width bounds every context, so the
            split count needs no host sync. seq_lens: ``[num_seqs]`` int32.
        fmt: the pages' format. sliding_window: as in the launch (checked only).
        config: tile/launch knobs; None picks :data:`DECODE_CONFIG` (d <= 128) or
            :data:`DECODE_CONFIG_D256`.
    Returns:
        A :class:`DecodePlan` for :func:`sawkv.kernels.paged_attention_decode`.
    """
    num_seqs = check_step_inputs(q, fmt, block_tables, seq_lens, sliding_window)
    config = config or (DECODE_CONFIG if fmt.head_dim <= 128 else DECODE_CONFIG_D256)
    _common_checks(q, fmt, block_tables, config)
    if q.shape[0] != num_seqs:
        raise ValueError(f"q has {q.shape[0]} tokens but there are {num_seqs} sequences (decode)")
    if config.impl not in ("auto", "triton", "cuda"):
        raise ValueError(f"config.impl must be auto, triton or cuda, got {config.impl!r}")
    if config.cta_warps not in (0, 4, 8):
        raise ValueError(f"config.cta_warps must be 0 (default), 4 or 8, got {config.cta_warps}")
    if config.cta_warps == 8 and (fmt.head_dim != 128 or config.groups_per_step not in (0, 1)):
        raise ValueError(
            "config.cta_warps=8 is compiled for head_dim 128 with groups_per_step 0 or 1 only, "
            f"got head_dim {fmt.head_dim}, groups_per_step {config.groups_per_step}"
        )
    num_q_heads = q.shape[1]
    impl = "triton"
    if config.impl != "triton" and num_seqs and _use_cuda(q, fmt, num_q_heads, config.impl):
        impl = "cuda"
        config = _with_env_cta_warps(config, fmt)
    max_tokens = block_tables.shape[1] * fmt.block_size
    splits = pick_num_splits(impl, config, num_seqs, fmt, max_tokens, _sm_count(q.device))
    part_o = part_ml = None
    # the Triton kernel also merges through the workspace when it rotates the output back
    if splits > 1 or (impl == "triton" and fmt.rotate_v):
        shape = (num_seqs, num_q_heads, splits)
        part_o = torch.empty((*shape, fmt.head_dim), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((*shape, 2), dtype=torch.float32, device=q.device)
    elif impl == "cuda":  # the extension takes tensors, not None
        part_o = part_ml = torch.empty(0, dtype=torch.float32, device=q.device)
    return DecodePlan(fmt, num_seqs, num_q_heads, impl, splits, config, part_o, part_ml)


# ---- extend -----------------------------------------------------------------------------------
def plan_extend(
    q: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    fmt: PageFormat,
    *,
    sliding_window: int = 0,
    max_query_len: int | None = None,
    seq_lens_host: list[int] | None = None,
    query_start_host: list[int] | None = None,
    config: KernelConfig | None = None,
    impl: str = "auto",
    num_sink: int = 0,
) -> ExtendPlan:
    """Check the step's extend inputs and decide the path, grid and workspaces.

    Args:
        q: ``[num_tokens, num_q_heads, head_dim]`` (shape, dtype and device used).
        block_tables, seq_lens, query_start_loc, fmt, sliding_window: as in
            :func:`sawkv.kernels.paged_attention_extend`.
        max_query_len: host-side bound on any q_len (sizes the grid; default num_tokens).
        seq_lens_host, query_start_host: host copies of ``seq_lens`` / ``query_start_loc``
            for the SDPA path (read from the device, one sync, if None).
        impl: "auto" (SDPA over dequantized pages for bf16/fp16 q on CUDA, else the fused
            Triton kernel), "triton" or "sdpa" (CPU included).
        num_sink: > 0 when the launches read attention sinks: SDPA then serves every dtype
            and device (the fused kernel has no sinks).
    Returns:
        An :class:`ExtendPlan`.
    """
    num_seqs = check_step_inputs(q, fmt, block_tables, seq_lens, sliding_window)
    config = config or EXTEND_CONFIG
    _common_checks(q, fmt, block_tables, config)
    check_query_start_loc(query_start_loc, num_seqs, q.device)
    if impl not in ("auto", "triton", "sdpa"):
        raise ValueError(f"impl must be auto, triton or sdpa, got {impl!r}")
    num_tokens = q.shape[0]
    fast = q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
    use_sdpa = impl == "sdpa" or (impl == "auto" and (fast or num_sink))
    if num_sink and not use_sdpa:
        raise ValueError(f"attention sinks are served by the SDPA extend path only, not {impl!r}")
    max_q = num_tokens if max_query_len is None else min(max_query_len, num_tokens)
    plan = ExtendPlan(fmt, num_seqs, num_tokens, "sdpa" if use_sdpa else "triton", config, max_q)
    if num_seqs == 0 or num_tokens == 0:
        return plan
    if use_sdpa:
        from sawkv.kernels.dequant import plan_sdpa

        lens = seq_lens.tolist() if seq_lens_host is None else seq_lens_host
        qsl = query_start_loc.tolist() if query_start_host is None else query_start_host
        plan.sdpa = plan_sdpa(q, fmt, lens, qsl, num_sink=num_sink)
    elif fmt.rotate_v:
        # the kernel writes fp32 un-rotated rows, rotated back into out afterwards
        plan.rotated = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    return plan
