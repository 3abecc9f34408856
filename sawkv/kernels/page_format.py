"""What a layer's pages look like: :class:`PageFormat` (frozen) and :class:`KVPages` (tensors).

Every kernel and the torch reference take ``(q, pages, fmt, out)``-style arguments: ``pages``
holds one layer's four tensors and ``fmt`` says how to read them. Layout of one layer (heads
outside tokens, so one head's page is one contiguous run)::

    k_cache, v_cache  [num_blocks, num_kv_heads, block_size, page_dim]   fmt.dtype
        page_dim = head_dim // 2 (INT4, two codes per byte), head_dim (INT8 codes; float rows
        of a 16-bit format); INT4/INT8 rows are byte-permuted in 16-token groups
        (tensor-core fragment order, ``page_layout.py``)
    k_meta            [num_blocks, num_kv_heads, block_size, k_meta_dim] fp16; None for 16
        k_meta_dim = 2: (scale, min) of the whole key;
        k_meta_dim = 4 (``k_half_meta``): (scale_lo, min_lo, scale_hi, min_hi), lo = rotated
        elements [0, d/2), hi = [d/2, d): the halves an INT4 byte packs (element i in its low
        nibble, i + d/2 in its high one), which the kernels already hold apart
    v_meta            [num_blocks, num_kv_heads, block_size, 2] fp16 (scale, min); None for 16

Keys are stored as ``R (k - mu)`` and values as ``R v`` (``rotate_v``) or ``v``, R the
block-diagonal Hadamard of block ``had_block`` (0 = none); ``x ~= code * scale + min`` with the
(scale, min) of the element's group. Torch only (a leaf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from sawkv.kernels.page_layout import GROUP

FLOAT_PAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
META_DTYPE = torch.float16


class KVPages(NamedTuple):
    """One layer's page tensors (shapes in the module docstring); unpacks as four tensors."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_meta: torch.Tensor | None
    v_meta: torch.Tensor | None


@dataclass(frozen=True)
class PageFormat:
    """How one layer's pages store K and V: everything a kernel needs besides the tensors.

    ``bits`` 4 / 8 (uint8 codes plus an fp16 (scale, min) per token and head) or 16 (float rows
    of ``dtype``, which must then be given); ``had_block`` 0 or the Hadamard block (a power of
    two in [16, min(head_dim, 256)] dividing head_dim); ``rotate_v`` values stored rotated too
    (needs ``had_block``). ``head_dim``, ``num_kv_heads`` and ``block_size`` fix the shapes.
    ``k_half_meta`` (bits 4/8 only): keys get one (scale, min) per half of the rotated vector
    (``k_meta [..., 4]``), so each half's range sets its own step: +32 bits per key and head.
    """

    bits: int
    head_dim: int
    num_kv_heads: int
    block_size: int
    had_block: int = 0
    rotate_v: bool = False
    dtype: torch.dtype | None = None  # page dtype; None -> uint8 for bits 4/8
    k_half_meta: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16):
            raise ValueError(
                f"bits must be 4, 8 or 16 (INT4, INT8 or float pages), got {self.bits}"
            )
        if self.bits == 16:
            if self.dtype not in FLOAT_PAGE_DTYPES:
                raise ValueError(
                    f"bits=16 pages need a float dtype in {list(FLOAT_PAGE_DTYPES)}, got "
                    f"{self.dtype}"
                )
        else:
            if self.dtype not in (None, torch.uint8):
                raise ValueError(f"INT{self.bits} pages are uint8, got dtype {self.dtype}")
            object.__setattr__(self, "dtype", torch.uint8)
            if self.block_size % GROUP:
                raise ValueError(
                    f"INT{self.bits} pages store tokens in groups of {GROUP} (fragment order), so "
                    f"block_size must be a multiple of {GROUP}, got {self.block_size}"
                )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even and positive, got {self.head_dim}")
        if self.num_kv_heads <= 0 or self.block_size <= 0:
            raise ValueError(
                f"num_kv_heads and block_size must be positive, got {self.num_kv_heads}, "
                f"{self.block_size}"
            )
        check_had_block(self.had_block, self.head_dim)
        if self.rotate_v and not self.had_block:
            raise ValueError("rotate_v needs had_block > 0")
        if self.k_half_meta and self.bits == 16:
            raise ValueError(
                "k_half_meta (one (scale, min) per half of each key) needs INT4/INT8 pages, got "
                "bits=16"
            )

    @property
    def is_quantized(self) -> bool:
        """INT4/INT8 codes with metadata (``k_meta, v_meta`` present)."""
        return self.bits < 16

    @property
    def page_dim(self) -> int:
        """Last dim of ``k_cache`` / ``v_cache``."""
        return self.head_dim // 2 if self.bits == 4 else self.head_dim

    def page_shape(self, num_blocks: int) -> tuple[int, int, int, int]:
        """Shape of ``k_cache`` / ``v_cache`` with ``num_blocks`` blocks."""
        return (num_blocks, self.num_kv_heads, self.block_size, self.page_dim)

    @property
    def k_meta_dim(self) -> int:
        """Last dim of ``k_meta``: 2 (scale, min), or 4 with ``k_half_meta``."""
        return 4 if self.k_half_meta else 2

    def meta_shape(self, num_blocks: int, *, is_key: bool) -> tuple[int, int, int, int]:
        """Shape of ``k_meta`` (``is_key``) or ``v_meta`` (INT4/INT8 formats) with
        ``num_blocks`` blocks."""
        last = self.k_meta_dim if is_key else 2
        return (num_blocks, self.num_kv_heads, self.block_size, last)

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one page (one block index) of one layer: K and V with their metadata."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        meta = 2 * (self.k_meta_dim + 2) if self.is_quantized else 0  # fp16 K and V metadata
        return self.num_kv_heads * self.block_size * (2 * self.page_dim * elem + meta)

    def empty_pages(self, num_blocks: int, device: torch.device | str = "cpu") -> KVPages:
        """Zero-filled pages of ``num_blocks`` blocks in this format."""
        shape = self.page_shape(num_blocks)

        def meta(is_key: bool):
            if not self.is_quantized:
                return None
            shape = self.meta_shape(num_blocks, is_key=is_key)
            return torch.zeros(shape, dtype=META_DTYPE, device=device)

        return KVPages(
            torch.zeros(shape, dtype=self.dtype, device=device),
            torch.zeros(shape, dtype=self.dtype, device=device),
            meta(True),
            meta(False),
        )


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
