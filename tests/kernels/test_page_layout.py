"""Fragment-ordered pages: the bytes a CUDA-kernel lane reads unpack into exactly the mma operands.

The check is written from the PTX definition of ``mma.m16n8k16`` operand A (row ``g`` / ``g+8``,
columns ``2t, 2t+1`` / ``+8``) and from how ``csrc/paged_decode.cuh`` consumes each word, not
from ``page_layout.py``'s own tables.
"""

from __future__ import annotations

import pytest
import torch

from sawkv.kernels.page_layout import from_pages, to_pages
from sawkv.quant.int4 import pack_int4


def _a_fragment(i: int, g: int, t: int, e: int) -> tuple[int, int]:
    """(row, col) of element e of register a_i of operand A (16 x 16), PTX ISA."""
    return g + 8 * (i % 2), 2 * t + 8 * (i // 2) + e


def _unpack_int4_word(word: int) -> list[tuple[int, int]]:
    """Which codes the kernel's mask/shift unpacking puts in register j: nibbles (j, j + 4)."""
    return [((word >> (4 * j)) & 0xF, (word >> (16 + 4 * j)) & 0xF) for j in range(4)]


def _unpack_int8_word(word: int) -> list[tuple[int, int]]:
    """prmt 0x4140 / 0x4342: registers (byte0, byte1) and (byte2, byte3)."""
    b = [(word >> (8 * k)) & 0xFF for k in range(4)]
    return [(b[0], b[1]), (b[2], b[3])]


def _kernel_operands(group: torch.Tensor, bits: int, head_dim: int, lane: int):
    """{(step, i): (lo, hi)} operand-A registers a_i of each k-step (keys) / m-tile (values)
    that lane builds from its words, following the kernel's unpack-and-mma code."""
    lane_bytes = group.numel() // 32
    raw = group[lane * lane_bytes : (lane + 1) * lane_bytes].tolist()
    words = [int.from_bytes(bytes(raw[4 * u : 4 * u + 4]), "little") for u in range(len(raw) // 4)]
    regs = {}
    if bits == 4:
        half = head_dim // 32
        for w in range(half):
            x0, x1 = _unpack_int4_word(words[2 * w]), _unpack_int4_word(words[2 * w + 1])
            # mma(step w) takes (x0[0], x0[2], x1[0], x1[2]); mma(step w + d/32) the odd ones
            for step, (a0, a1, a2, a3) in ((w, (x0[0], x0[2], x1[0], x1[2])),
                                           (w + half, (x0[1], x0[3], x1[1], x1[3]))):  # fmt: skip
                regs.update({(step, 0): a0, (step, 1): a1, (step, 2): a2, (step, 3): a3})
    else:
        for w in range(head_dim // 16):
            x0, x1 = _unpack_int8_word(words[2 * w]), _unpack_int8_word(words[2 * w + 1])
            regs.update({(w, 0): x0[0], (w, 1): x0[1], (w, 2): x1[0], (w, 3): x1[1]})
    return regs


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("is_key", [True, False])
def test_lane_words_are_mma_operands(bits, head_dim, is_key):
    g_ = torch.Generator().manual_seed(head_dim + bits)
    levels = 16 if bits == 4 else 256
    codes = torch.randint(0, levels, (2, 16, head_dim), generator=g_, dtype=torch.uint8)
    rows = pack_int4(codes) if bits == 4 else codes  # canonical rows [2 groups x 16, P]
    pages = to_pages(rows.reshape(1, 32, -1), bits, is_key)[0]  # one page of 32 tokens
    assert torch.equal(from_pages(pages[None], bits, is_key)[0], rows.reshape(32, -1))
    for grp in range(2):
        group = pages[16 * grp : 16 * grp + 16].reshape(-1)
        x = codes[grp]  # [token, d]
        for lane in range(32):
            g, t = lane // 4, lane % 4
            regs = _kernel_operands(group, bits, head_dim, lane)
            assert len(regs) == 4 * head_dim // 16
            for (step, i), pair in regs.items():
                want = []
                for e in (0, 1):
                    row, col = _a_fragment(i, g, t, e)
                    # keys: A = K (row token, col d); values: A = V^T (row d, col token)
                    tok, d = (row, 16 * step + col) if is_key else (col, 16 * step + row)
                    want.append(int(x[tok, d]))
                assert list(pair) == want, (lane, step, i)
