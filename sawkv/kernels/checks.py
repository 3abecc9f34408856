"""Argument checks shared by the Triton launchers and the torch reference (torch only, no triton).

Every function raises ``ValueError`` naming the argument and what was expected, so a caller that
passes a wrong layout learns it at the call site rather than from a kernel fault. The format
itself (bits, had_block, rotate_v, shapes) is validated once, by :class:`PageFormat`.
"""

from __future__ import annotations

import torch

from sawkv.kernels.page_format import KVPages, PageFormat

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t, ndim: int, dtypes, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} dtype must be one of {list(dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_format(fmt) -> None:
    if not isinstance(fmt, PageFormat):
        raise ValueError(f"fmt must be a PageFormat, got {type(fmt).__name__}")


def check_pages(pages: KVPages, fmt: PageFormat, device) -> int:
    """Check one layer's pages against ``fmt``; return ``num_blocks``.

    ``k_cache, v_cache [num_blocks, num_kv_heads, block_size, page_dim]`` of ``fmt.dtype``;
    ``k_meta [num_blocks, num_kv_heads, block_size, fmt.k_meta_dim]`` and ``v_meta [...,
    2]`` fp16, or None for bits=16.
    """
    check_format(fmt)
    if not isinstance(pages, tuple) or len(pages) != 4:
        raise ValueError("pages must be KVPages(k_cache, v_cache, k_meta, v_meta)")
    k_cache, v_cache, k_meta, v_meta = pages
    check_tensor("k_cache", k_cache, 4, (fmt.dtype,), device)
    num_blocks = k_cache.shape[0]
    if k_cache.shape[-1] != fmt.page_dim:
        raise ValueError(
            f"k_cache last dim {k_cache.shape[-1]} does not fit head_dim {fmt.head_dim} with "
            f"bits={fmt.bits} (expected {fmt.page_dim})"
        )
    check_shape("k_cache", k_cache, fmt.page_shape(num_blocks))
    check_tensor("v_cache", v_cache, 4, (fmt.dtype,), device)
    check_shape("v_cache", v_cache, k_cache.shape)
    if fmt.is_quantized:
        for name, m in (("k_meta", k_meta), ("v_meta", v_meta)):
            check_tensor(name, m, 4, (torch.float16,), device)
            want = fmt.meta_shape(num_blocks, is_key=name == "k_meta")
            if m.shape[-1] != want[-1]:
                raise ValueError(
                    f"{name} last dim {m.shape[-1]} does not fit the format: {want[-1]} fp16 per "
                    f"token and head (k_half_meta={fmt.k_half_meta})"
                )
            check_shape(name, m, want)
    elif k_meta is not None or v_meta is not None:
        raise ValueError("k_meta and v_meta must be None for bits=16 pages")
    for name, t in zip(KVPages._fields, pages):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return num_blocks


def check_write_inputs(k, v, pages: KVPages, slot_mapping, fmt: PageFormat, k_mean) -> int:
    """Validate :func:`cache_write` arguments; return ``num_tokens``."""
    check_format(fmt)
    check_tensor("k", k, 3, FLOAT_DTYPES)
    device = k.device
    check_tensor("v", v, 3, FLOAT_DTYPES, device)
    check_shape("v", v, k.shape)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_kv_heads != fmt.num_kv_heads:
        raise ValueError(f"k has {num_kv_heads} KV heads but the pages have {fmt.num_kv_heads}")
    if head_dim != fmt.head_dim:
        raise ValueError(f"k has head_dim {head_dim} but the page format {fmt.head_dim}")
    check_pages(pages, fmt, device)
    check_tensor("slot_mapping", slot_mapping, 1, INDEX_DTYPES, device)
    check_shape("slot_mapping", slot_mapping, (num_tokens,))
    if k_mean is not None:
        check_tensor("k_mean", k_mean, 2, FLOAT_DTYPES, device)
        check_shape("k_mean", k_mean, (num_kv_heads, head_dim))
    return num_tokens


def check_step_inputs(q, fmt: PageFormat, block_tables, seq_lens, sliding_window) -> int:
    """Validate what decode and extend share apart from the pages (once per step and format
    when planned); return ``num_seqs``.

    ``q [num_tokens, num_q_heads, head_dim]`` float; ``block_tables [num_seqs, max_blocks]``
    int32; ``seq_lens [num_seqs]`` int32.
    """
    check_format(fmt)
    check_tensor("q", q, 3, FLOAT_DTYPES)
    device = q.device
    _, num_q_heads, head_dim = q.shape
    if head_dim != fmt.head_dim:
        raise ValueError(f"q has head_dim {head_dim} but the page format {fmt.head_dim}")
    if num_q_heads % fmt.num_kv_heads:
        raise ValueError(
            f"num_q_heads {num_q_heads} must be a multiple of num_kv_heads {fmt.num_kv_heads} (GQA)"
        )
    check_tensor("block_tables", block_tables, 2, (torch.int32,), device)
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,), device)
    num_seqs = seq_lens.shape[0]
    if block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables has {block_tables.shape[0]} rows but seq_lens has {num_seqs} sequences"
        )
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0 = full attention), got {sliding_window}")
    return num_seqs


def check_attention_inputs(q, pages, fmt, block_tables, seq_lens, sliding_window) -> int:
    """:func:`check_step_inputs` plus the pages; return ``num_seqs``."""
    num_seqs = check_step_inputs(q, fmt, block_tables, seq_lens, sliding_window)
    check_pages(pages, fmt, q.device)
    return num_seqs


def check_query_start_loc(query_start_loc, num_seqs: int, device) -> None:
    check_tensor("query_start_loc", query_start_loc, 1, (torch.int32,), device)
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"query_start_loc must have num_seqs + 1 = {num_seqs + 1} entries, "
            f"got {query_start_loc.shape[0]}"
        )


def check_out(out, shape, dtype, device) -> None:
    if out is None:
        return
    check_tensor("out", out, 3, (dtype,), device)
    check_shape("out", out, shape)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
