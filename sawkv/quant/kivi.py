"""KIVI-style KV quantization (Liu et al., 2024): keys per channel, values per token.

Name grammar: ``kivi{k}[-g{G}][-r{R}]`` with k in {2, 3, 4, 8}, defaults ``-g32 -r128``.

What exactly is implemented (evaluation-only, fake-quant; not servable by the paged engine):

* **Keys**, per channel over groups of ``G`` consecutive tokens: for every group of G tokens,
  every (KV head, channel) gets its own asymmetric (scale, min) in fp16 over those G values.
  This is what handles the outlier *channels* of keys without a rotation.
* **Values**, per token: each token x head vector is split into groups of ``G`` channels (the
  whole head when ``G >= head_dim``) with one fp16 (scale, min) per group.
* **Residual window**: the most recent tokens stay in full precision. Of a sequence of ``L``
  tokens the oldest ``floor((L - R) / G) * G`` are quantized (a whole number of key groups), so
  the full-precision tail holds between ``R`` and ``R + G - 1`` tokens. Both K and V follow the
  same split. The tail is recomputed at every read, as KIVI's cache flushes full groups.

Bits per element (quantized part, metadata included): ``k + 32 / G`` for keys (one fp16 pair per
channel per G tokens) and ``k + 32 / min(G, head_dim)`` for values; :meth:`bits_per_element`
reports the K/V average. The full-precision residual adds ``16 * (R..R+G) / L`` bits on top, a
per-sequence cost that vanishes for long contexts; it is *not* included (stated in reports).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sawkv.quant.int4 import dequantize_int, quantize_int

_KIVI_RE = re.compile(r"^kivi(\d+)((?:-[gr]\d+)*)$")


@dataclass(frozen=True)
class KiviMethod:
    """KIVI: per-channel keys over token groups, per-token values, full-precision recent tokens."""

    bits: int = 2
    group_size: int = 32
    residual: int = 128

    is_servable = False
    token_wise = False
    seq_dependent = True  # a key group's range depends on its neighbours: re-quantize on read

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"KIVI bits must be one of 2, 3, 4, 8, got {self.bits}")
        if self.group_size <= 0 or self.residual < 0:
            raise ValueError(
                f"KIVI needs group size > 0 and residual >= 0, got g={self.group_size} "
                f"r={self.residual}"
            )

    @property
    def name(self) -> str:
        return f"kivi{self.bits}-g{self.group_size}-r{self.residual}"

    def __str__(self) -> str:
        return self.name

    def resolve(self, head_dim: int) -> KiviMethod:
        g = min(self.group_size, head_dim)
        if head_dim % g:
            raise ValueError(
                f"KIVI value group size {self.group_size} does not divide head_dim {head_dim}"
            )
        return self

    def bits_per_element(self, head_dim: int, model_dtype_bits: int = 16) -> float:
        """K/V average bits of the quantized part incl. fp16 (scale, min); residual excluded."""
        k_bits = self.bits + 32 / self.group_size
        v_bits = self.bits + 32 / min(self.group_size, head_dim)
        return (k_bits + v_bits) / 2

    def num_quantized(self, seq_len: int) -> int:
        """How many of the oldest ``seq_len`` tokens are quantized (a multiple of G)."""
        return max(0, seq_len - self.residual) // self.group_size * self.group_size

    def fake_quant_seq(
        self, x: torch.Tensor, *, is_key: bool, layer_idx: int = 0, k_mean=None, start: int = 0
    ) -> torch.Tensor:
        """What attention reads for a whole sequence.

        Args:
            x: ``[seq, num_kv_heads, head_dim]`` keys or values of one sequence (all of it:
                the split into quantized groups and residual depends on the length).
            is_key: per-channel (keys) or per-token (values) quantization.
            layer_idx, k_mean, start: unused (KIVI needs no calibration).
        Returns:
            ``[seq, num_kv_heads, head_dim]`` in ``x.dtype``.
        """
        n = self.num_quantized(x.shape[0])
        if n == 0:
            return x
        q = (
            quantize_keys_per_channel(x[:n], self.bits, self.group_size)
            if is_key
            else (quantize_values_per_token(x[:n], self.bits, self.group_size))
        )
        return torch.cat([q.to(x.dtype), x[n:]], dim=0)


def quantize_keys_per_channel(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Fake-quant ``x [seq, H, d]`` (seq a multiple of G) per (token group, head, channel)."""
    s, h, d = x.shape
    if s % group_size:
        raise ValueError(f"key length {s} is not a multiple of the group size {group_size}")
    # [s/G, G, H, d] -> [s/G, H, d, G]: the quantized axis (tokens of one group) goes last.
    xg = x.float().reshape(s // group_size, group_size, h, d).permute(0, 2, 3, 1)
    codes, meta = quantize_int(xg, bits)
    return dequantize_int(codes, meta).permute(0, 3, 1, 2).reshape(s, h, d)


def quantize_values_per_token(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Fake-quant ``x [seq, H, d]`` per token over groups of ``min(G, d)`` channels."""
    g = min(group_size, x.shape[-1])
    codes, meta = quantize_int(x.float(), bits, g)
    return dequantize_int(codes, meta)


def parse_kivi(name: str) -> KiviMethod:
    """``kivi2``, ``kivi4-g32-r128``, ``kivi2-r64`` ... -> :class:`KiviMethod`."""
    m = _KIVI_RE.match(name)
    if not m:
        raise ValueError(f"bad KIVI method name {name!r}: expected kivi{{k}}[-g{{G}}][-r{{R}}]")
    fields = {}
    for part in filter(None, m.group(2).split("-")):
        key = {"g": "group_size", "r": "residual"}[part[0]]
        if key in fields:
            raise ValueError(f"bad KIVI method name {name!r}: -{part[0]} given twice")
        fields[key] = int(part[1:])
    return KiviMethod(bits=int(m.group(1)), **fields)
