"""Sensitivity-based mixed precision per (layer, KV head), with optional full-precision sinks.

Name grammar: ``mixed{B}[-bdr{b}][-kv][-s{S}]``, e.g. ``mixed4.5``, ``mixed4.5-s4``, ``mixed3``.

What exactly is implemented (evaluation-only fake-quant; the paged engine stores one format):

* Two token-wise levels: for ``B >= 4`` the low level is ``int4-bdr[{b}][-kv]-kc`` and the high
  one ``int8-bdr[{b}][-kv]-kc``; for ``2 <= B < 4`` they are INT2 and INT4 (same suffixes).
  Bare ``-bdr`` is min(128, head_dim).
* The allocation gives the high level to the ``floor(U * (B - low) / (high - low))`` most
  sensitive of the ``U = num_layers * num_kv_heads`` units, so the average *code* bits per
  element is at most ``B`` (metadata excluded from the budget, included in
  :meth:`bits_per_element`). Sensitivity = KL(full-precision || only-this-head-quantized-at-the-
  low-level), measured on calibration windows by :mod:`sawkv.eval.sensitivity`.
* ``-s{S}``: the first S tokens of every sequence (attention sinks) stay in full precision; their
  cost (``16 * S / L`` bits per element) is not counted in bits per element (stated in reports).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch

from sawkv.quant.methods import KVMethod

_MIXED_RE = re.compile(r"^mixed(\d+(?:\.\d+)?)((?:-(?:bdr\d*|kv|s\d+))*)$")


@dataclass(frozen=True)
class MixedMethod:
    """Per-(layer, KV head) choice between a low and a high token-wise INT level."""

    avg_bits: float = 4.5
    had_block: int = -1
    rotate_v: bool = False
    num_sinks: int = 0
    # allocation[layer, head] = code bits (low or high) of that unit
    allocation: torch.Tensor | None = field(default=None, compare=False, repr=False)

    is_servable = False
    token_wise = False
    seq_dependent = False  # per token (sinks by absolute position): encode once per token
    center_k = True

    def __post_init__(self):
        if not 2 <= self.avg_bits <= 8:
            raise ValueError(f"mixed precision budget must be in [2, 8] bits, got {self.avg_bits}")
        if self.num_sinks < 0:
            raise ValueError(f"number of sink tokens must be >= 0, got {self.num_sinks}")

    @property
    def name(self) -> str:
        b = f"{self.avg_bits:g}"
        parts = [f"mixed{b}"]
        if self.had_block != -1:
            parts.append(f"bdr{self.had_block}")
        if self.rotate_v:
            parts.append("kv")
        if self.num_sinks:
            parts.append(f"s{self.num_sinks}")
        return "-".join(parts)

    def __str__(self) -> str:
        return self.name

    @property
    def levels(self) -> tuple[int, int]:
        """(low, high) code bits."""
        return (4, 8) if self.avg_bits >= 4 else (2, 4)

    def level_method(self, bits: int) -> KVMethod:
        return KVMethod(
            kind="int", bits=bits, had_block=self.had_block, rotate_v=self.rotate_v, center_k=True
        )

    @property
    def low_method(self) -> KVMethod:
        return self.level_method(self.levels[0])

    @property
    def needs_calibration(self) -> bool:
        return self.allocation is None

    def resolve(self, head_dim: int) -> MixedMethod:
        m = self
        if m.had_block == -1:
            m = replace(m, had_block=min(128, head_dim))
        m.low_method.resolve(head_dim)
        return m

    def num_high(self, num_units: int) -> int:
        """How many units the budget lets run at the high level."""
        lo, hi = self.levels
        return min(num_units, math.floor(num_units * (self.avg_bits - lo) / (hi - lo) + 1e-9))

    def fit(self, sensitivity: torch.Tensor) -> MixedMethod:
        """Allocate bits from a sensitivity profile ``[num_layers, num_kv_heads]`` (higher = more
        sensitive; ties go to the earlier unit)."""
        lo, hi = self.levels
        flat = sensitivity.flatten().double()
        order = torch.sort(-flat, stable=True).indices
        alloc = torch.full_like(flat, lo, dtype=torch.int64)
        alloc[order[: self.num_high(flat.numel())]] = hi
        return replace(self, allocation=alloc.reshape(sensitivity.shape))

    def bits_per_element(self, head_dim: int, model_dtype_bits: int = 16) -> float:
        """Average over units of each level's bits incl. metadata (nominal before fitting)."""
        lo, hi = self.levels
        b_lo = self.level_method(lo).bits_per_element(head_dim)
        b_hi = self.level_method(hi).bits_per_element(head_dim)
        if self.allocation is None:
            return b_lo + (b_hi - b_lo) * (self.avg_bits - lo) / (hi - lo)
        frac_hi = (self.allocation == hi).double().mean().item()
        return b_lo + (b_hi - b_lo) * frac_hi

    def average_code_bits(self) -> float:
        if self.allocation is None:
            raise ValueError(f"{self.name} is not calibrated: call .fit(sensitivity)")
        return self.allocation.double().mean().item()

    def fake_quant_seq(
        self, x: torch.Tensor, *, is_key: bool, layer_idx: int, k_mean=None, start: int = 0
    ) -> torch.Tensor:
        """``x [seq, H, d]`` whose first token is at position ``start`` -> what attention reads."""
        if self.allocation is None:
            raise ValueError(f"{self.name} is not calibrated: call .fit(sensitivity)")
        d = x.shape[-1]
        heads = []
        for h in range(x.shape[1]):
            m = self.level_method(int(self.allocation[layer_idx, h])).resolve(d)
            mu = None if k_mean is None else k_mean[h : h + 1]
            heads.append(m.fake_quant(x[:, h : h + 1], is_key=is_key, k_mean=mu))
        y = torch.cat(heads, dim=1)
        num_fp = min(max(self.num_sinks - start, 0), x.shape[0])
        if num_fp:
            y = torch.cat([x[:num_fp], y[num_fp:]], dim=0)
        return y


def parse_mixed(name: str) -> MixedMethod:
    """``mixed4.5``, ``mixed4.5-s4``, ``mixed3-bdr64-kv`` -> :class:`MixedMethod`."""
    m = _MIXED_RE.match(name)
    if not m:
        raise ValueError(
            f"bad mixed-precision method name {name!r}: "
            "expected mixed{B}[-bdr{b}][-kv][-s{S}]"
        )
    fields: dict = {}
    for part in filter(None, m.group(2).split("-")):
        if part == "kv":
            key, val = "rotate_v", True
        elif part.startswith("s"):
            key, val = "num_sinks", int(part[1:])
        else:
            key, val = "had_block", (int(part[3:]) if len(part) > 3 else -1)
        if key in fields:
            raise ValueError(f"bad mixed-precision method name {name!r}: -{part} given twice")
        fields[key] = val
    return MixedMethod(avg_bits=float(m.group(1)), **fields)
