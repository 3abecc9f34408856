"""Argument checks shared by the Triton launchers and the torch reference (torch only, no triton).

Every function raises ``ValueError`` naming the argument and what was expected, so a caller that
passes a wrong layout learns it at the call site rather than from a kernel fault.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_bits(bits: int) -> None:
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16 (INT4, INT8 or float pages), got {bits}")


def check_had_block(had_block: int, head_dim: int) -> None:
    """``had_block``: 0 (no rotation) or a power of two in [16, min(head_dim, 256)] dividing it."""
    ok = had_block == 0 or (
        16 <= had_block <= min(head_dim, 256)
        and had_block & (had_block - 1) == 0
        and head_dim % had_block == 0
    )
    if not ok:
        raise ValueError(
            f"had_block must be 0 (no rotation) or a power of two in [16, min(head_dim, 256)] "
            f"dividing head_dim={head_dim}, got {had_block}"
        )


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


def check_pages(
    k_cache, v_cache, k_meta, v_meta, *, bits: int, head_dim: int | None, device
) -> tuple[int, int, int, int]:
    """Check one layer's pages; return ``(num_blocks, num_kv_heads, block_size, head_dim)``.

    ``k_cache, v_cache [num_blocks, num_kv_heads, block_size, P]``: uint8 with P = head_dim // 2
    (bits=4) or head_dim (bits=8); a float dtype with P = head_dim (bits=16).
    ``k_meta, v_meta [num_blocks, num_kv_heads, block_size, 2]`` fp16, or None for bits=16.
    With ``head_dim=None`` it is inferred from P.
    """
    check_bits(bits)
    page_dtypes = FLOAT_DTYPES if bits == 16 else (torch.uint8,)
    check_tensor("k_cache", k_cache, 4, page_dtypes, device)
    check_tensor("v_cache", v_cache, 4, page_dtypes, device)
    check_shape("v_cache", v_cache, k_cache.shape)
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache dtype {v_cache.dtype} differs from k_cache dtype {k_cache.dtype}"
        )
    num_blocks, num_kv_heads, block_size, p = k_cache.shape
    d = p * 2 if bits == 4 else p
    if head_dim is not None and d != head_dim:
        raise ValueError(
            f"k_cache last dim {p} does not fit head_dim {head_dim} with bits={bits} "
            f"(expected {head_dim // 2 if bits == 4 else head_dim})"
        )
    if bits == 16:
        if k_meta is not None or v_meta is not None:
            raise ValueError("k_meta and v_meta must be None for bits=16 pages")
    else:
        if block_size % 16:
            raise ValueError(
                f"INT{bits} pages store tokens in groups of 16 (fragment order), so block_size "
                f"must be a multiple of 16, got {block_size}"
            )
        for name, m in (("k_meta", k_meta), ("v_meta", v_meta)):
            check_tensor(name, m, 4, (torch.float16,), device)
            check_shape(name, m, (num_blocks, num_kv_heads, block_size, 2))
    for name, t in (
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("k_meta", k_meta),
        ("v_meta", v_meta),
    ):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return num_blocks, num_kv_heads, block_size, d


def check_write_inputs(
    k, v, k_cache, v_cache, k_meta, v_meta, slot_mapping, k_mean, bits, had_block
):
    """Validate :func:`cache_write` arguments; return ``(num_tokens, num_kv_heads, head_dim)``."""
    check_tensor("k", k, 3, FLOAT_DTYPES)
    device = k.device
    check_tensor("v", v, 3, FLOAT_DTYPES, device)
    check_shape("v", v, k.shape)
    num_tokens, num_kv_heads, head_dim = k.shape
    _, h, _, _ = check_pages(
        k_cache, v_cache, k_meta, v_meta, bits=bits, head_dim=head_dim, device=device
    )
    if h != num_kv_heads:
        raise ValueError(f"k has {num_kv_heads} KV heads but the pages have {h}")
    if bits == 4 and head_dim % 2:
        raise ValueError(f"INT4 pages need an even head_dim, got {head_dim}")
    check_had_block(had_block, head_dim)
    check_tensor("slot_mapping", slot_mapping, 1, INDEX_DTYPES, device)
    check_shape("slot_mapping", slot_mapping, (num_tokens,))
    if k_mean is not None:
        check_tensor("k_mean", k_mean, 2, FLOAT_DTYPES, device)
        check_shape("k_mean", k_mean, (num_kv_heads, head_dim))
    return num_tokens, num_kv_heads, head_dim


def check_attention_inputs(
    q, k_cache, v_cache, k_meta, v_meta, block_tables, seq_lens, bits, had_block, sliding_window
) -> tuple[int, int, int, int, int]:
    """Validate the arguments shared by decode and extend.

    Returns ``(num_q_heads, num_kv_heads, block_size, head_dim, num_seqs)``.
    """
    check_tensor("q", q, 3, FLOAT_DTYPES)
    device = q.device
    _, num_q_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = check_pages(
        k_cache, v_cache, k_meta, v_meta, bits=bits, head_dim=head_dim, device=device
    )
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads {num_q_heads} must be a multiple of num_kv_heads {num_kv_heads} (GQA)"
        )
    check_had_block(had_block, head_dim)
    check_tensor("block_tables", block_tables, 2, (torch.int32,), device)
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,), device)
    num_seqs = seq_lens.shape[0]
    if block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables has {block_tables.shape[0]} rows but seq_lens has {num_seqs} sequences"
        )
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0 = full attention), got {sliding_window}")
    return num_q_heads, num_kv_heads, block_size, head_dim, num_seqs


def check_out(out, shape, dtype, device) -> None:
    if out is None:
        return
    check_tensor("out", out, 3, (dtype,), device)
    check_shape("out", out, shape)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
