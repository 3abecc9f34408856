"""KV cache methods, parsed from names such as ``int4-bdr128-kv-kc``.

Grammar (suffixes in any order; :attr:`KVMethod.name` prints the canonical order)::

    saw-int4 | auto | bf16 | fp16 | fp8 | int{k}[-g{G}][-bdr[{b}]][-kv][-kc][-kh]   k in 2, 3, 4, 8

* ``saw-int4``: the model's calibrated per-layer recipe (:mod:`sawkv.quant.recipe`); parses to
  a placeholder that a cache or the engine resolves for its model.
* ``auto``: K/V kept in the model's dtype (the reference).
* ``bf16`` / ``fp16``: K/V rounded to that dtype.
* ``fp8``: float8 e4m3 per token x head with an fp32 scale.
* ``int{k}``: asymmetric per token x head quantization with fp16 (scale, min);
  ``-g{G}`` one (scale, min) per G elements (default: the whole head);
  ``-bdr{b}`` block-diagonal Hadamard rotation with block b before quantizing (bare ``-bdr``:
  min(128, head_dim)), keys only unless ``-kv``; ``-kc`` subtract a calibrated per-(layer,
  KV head) key mean first (exact for attention: softmax ignores the shared shift q.mu);
  ``-kh`` keys with per-half metadata: one (scale, min) for each half of the (rotated) key
  vector, elements [0, d/2) and [d/2, d), instead of one per key (+32 bits per key and head;
  values keep one pair). Not with ``-g{G}``, which already sets the groups of both.

Storage: INT4 is really packed two codes per byte, INT8 one per byte. INT3 and INT2 are
*simulated* (fake-quant): codes are kept one per byte, and :meth:`KVMethod.bits_per_element`
reports the size a bit-packed layout would have.

Evaluation-only methods (KIVI, k-means, GPTQ, mixed precision) register a factory with
:func:`register_method` when :mod:`sawkv.eval` is imported (:mod:`sawkv.eval.baselines`), so a
serving process that imports only :mod:`sawkv.quant` never loads them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from sawkv.quant.hadamard import check_had_block, rotate
from sawkv.quant.int4 import (
    dequantize_fp8,
    dequantize_int,
    pack_int4,
    quantize_fp8,
    quantize_int,
    unpack_int4,
)

INT_BITS = (2, 3, 4, 8)
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_INT_RE = re.compile(r"^int(\d+)$")
_SUFFIX_RE = re.compile(r"^(g\d+|bdr\d*|kv|kc|kh)$")
BUILTIN_NAMES = [
    "saw-int4",
    "auto",
    "bf16",
    "fp16",
    "fp8",
    "int{2,3,4,8}[-g{G}][-bdr[{b}]][-kv][-kc][-kh]",
]


@dataclass
class Encoded:
    """One quantized tensor as a cache stores it.

    ``data``: INT4 ``[..., d // 2]`` uint8 packed; INT8/3/2 ``[..., d]`` uint8 codes; FP8
    ``[..., d]`` float8_e4m3fn; float methods ``[..., d]`` in their dtype.
    ``meta``: ``[..., num_groups, 2]`` fp16 (scale, min) for int (num_groups = 2 for keys of a
    ``-kh`` method: lo half, hi half); ``[..., 1]`` fp32 scale for FP8; None for float methods.
    """

    data: torch.Tensor
    meta: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        return n + (0 if self.meta is None else self.meta.numel() * self.meta.element_size())


@dataclass(frozen=True)
class KVMethod:
    """A KV cache storage method. Build with :func:`parse_method`, not directly.

    ``had_block = -1`` means "bare ``-bdr``", settled by :meth:`resolve` once head_dim is known.
    """

    kind: str  # "auto" | "float" | "fp8" | "int"
    bits: int = 16
    dtype_name: str | None = None  # "bf16" | "fp16" for kind == "float"
    group_size: int | None = None
    had_block: int | None = None
    rotate_v: bool = False
    center_k: bool = False
    k_half_meta: bool = False  # keys: one (scale, min) per half of the rotated vector

    def __post_init__(self) -> None:
        if self.k_half_meta and (self.kind != "int" or self.group_size is not None):
            raise ValueError(
                "-kh (per-half key metadata) applies to int methods without -g{G} "
                f"(kind={self.kind!r}, group_size={self.group_size})"
            )

    # ---- naming -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        if self.kind == "auto":
            return "auto"
        if self.kind == "float":
            return self.dtype_name
        if self.kind == "fp8":
            return "fp8"
        parts = [f"int{self.bits}"]
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if self.had_block is not None:
            parts.append("bdr" if self.had_block == -1 else f"bdr{self.had_block}")
        if self.rotate_v:
            parts.append("kv")
        if self.center_k:
            parts.append("kc")
        if self.k_half_meta:
            parts.append("kh")
        return "-".join(parts)

    def __str__(self) -> str:
        return self.name

    @property
    def is_quantized(self) -> bool:
        return self.kind in ("fp8", "int")

    @property
    def is_packed_storage(self) -> bool:
        """True where the cache really stores the quantized bytes (INT4, INT8); else simulated."""
        return self.kind == "int" and self.bits in (4, 8)

    @property
    def is_servable(self) -> bool:
        """Whether the paged serving engine can store this method (auto/bf16/fp16/INT4/INT8)."""
        return self.kind in ("auto", "float") or (
            self.kind == "int" and self.bits in (4, 8) and self.group_size is None
        )

    # ---- head_dim dependent ------------------------------------------------------------
    def resolve(self, head_dim: int) -> KVMethod:
        """Settle bare ``-bdr`` and check block/group sizes against ``head_dim``."""
        m = self
        if m.had_block == -1:
            m = replace(m, had_block=min(128, head_dim))
        if m.had_block is not None:
            check_had_block(m.had_block, head_dim)
        if m.group_size is not None and (m.group_size <= 0 or head_dim % m.group_size):
            divisors = [g for g in (8, 16, 32, 64, 128, 256) if head_dim % g == 0 and g < head_dim]
            raise ValueError(
                f"group size {m.group_size} does not divide head_dim {head_dim}; "
                f"valid group sizes: {divisors}"
            )
        if m.kind == "int" and m.bits == 4 and head_dim % 2:
            raise ValueError(f"INT4 packing needs an even head_dim, got {head_dim}")
        if m.k_half_meta and head_dim % 2:
            raise ValueError(
                f"-kh splits keys into halves and needs an even head_dim, got {head_dim}"
            )
        return m

    def group_size_for(self, head_dim: int, *, is_key: bool) -> int | None:
        """Elements sharing one (scale, min) in a K (``is_key``) or V vector; None = all."""
        if is_key and self.k_half_meta:
            return head_dim // 2
        return self.group_size

    def meta_bytes_per_vector(self, head_dim: int, *, is_key: bool = True) -> int:
        """Metadata bytes of one K (``is_key``) or V vector of one head."""
        if self.kind == "int":
            return 4 * (head_dim // (self.group_size_for(head_dim, is_key=is_key) or head_dim))
        return 4 if self.kind == "fp8" else 0

    def bits_per_element(self, head_dim: int, model_dtype_bits: int = 16) -> float:
        """Average stored bits per K/V element including (scale, min) metadata: the mean of
        K's and V's (they differ with ``-kh``: ``bits + 64/d`` and ``bits + 32/d``)."""
        if self.kind == "auto":
            return float(model_dtype_bits)
        if self.kind == "float":
            return 16.0
        meta = sum(self.meta_bytes_per_vector(head_dim, is_key=k) for k in (True, False)) / 2
        return self.bits + 8 * meta / head_dim

    def bytes_per_vector(self, head_dim: int) -> float:
        """Bytes one token x head vector (K or V, on average) occupies, metadata included."""
        return self.bits_per_element(head_dim) * head_dim / 8

    # ---- encode / decode ----------------------------------------------------------------
    def _check_ready(self, x: torch.Tensor) -> int:
        d = x.shape[-1]
        if self.had_block == -1:
            raise ValueError(f"method {self.name} is not resolved; call .resolve(head_dim)")
        self.resolve(d)
        return d

    def encode(self, x: torch.Tensor, *, is_key: bool, k_mean: torch.Tensor | None = None):
        """Transform and quantize K or V.

        Args:
            x: ``[..., num_kv_heads, head_dim]`` (post-RoPE keys or values).
            is_key: keys get centering (``-kc``) and rotation; values get rotation with ``-kv``.
            k_mean: ``[num_kv_heads, head_dim]`` key mean (``-kc``); None means zero.
        Returns:
            :class:`Encoded`. Keys are stored centered and rotated (``R (k - mu)``).
        """
        self._check_ready(x)
        if self.kind == "auto":
            return Encoded(x, None)
        if self.kind == "float":
            return Encoded(x.to(FLOAT_DTYPES[self.dtype_name]), None)
        x = self.transform(x, is_key=is_key, k_mean=k_mean)
        if self.kind == "fp8":
            return Encoded(*quantize_fp8(x))
        group = self.group_size_for(x.shape[-1], is_key=is_key)
        codes, meta = quantize_int(x, self.bits, group)
        return Encoded(pack_int4(codes) if self.bits == 4 else codes, meta)

    def decode(
        self,
        enc: Encoded,
        *,
        is_key: bool,
        k_mean: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        rotated: bool = False,
    ) -> torch.Tensor:
        """Dequantize. With ``rotated=False`` undo rotation and centering (model space); with
        ``rotated=True`` return what attention reads in the rotated, centered space."""
        if self.kind in ("auto", "float"):
            return enc.data.to(dtype)
        if self.kind == "fp8":
            x = dequantize_fp8(enc.data, enc.meta)
        else:
            codes = unpack_int4(enc.data) if self.bits == 4 else enc.data
            x = dequantize_int(codes, enc.meta)
        if not rotated:
            x = self.untransform(x, is_key=is_key, k_mean=k_mean)
        return x.to(dtype)

    def rotates(self, is_key: bool) -> bool:
        return self.had_block is not None and (is_key or self.rotate_v)

    def transform(self, x, *, is_key: bool, k_mean=None) -> torch.Tensor:
        """fp32 ``R (x - mu)`` (keys) / ``R x`` (values with ``-kv``) / ``x``."""
        x = x.float()
        if is_key and self.center_k and k_mean is not None:
            x = x - k_mean.float()
        return rotate(x, self.had_block) if self.rotates(is_key) else x

    def untransform(self, x, *, is_key: bool, k_mean=None) -> torch.Tensor:
        """Inverse of :meth:`transform` (R is its own inverse)."""
        x = x.float()
        if self.rotates(is_key):
            x = rotate(x, self.had_block)
        if is_key and self.center_k and k_mean is not None:
            x = x + k_mean.float()
        return x

    def fake_quant(self, x: torch.Tensor, *, is_key: bool, k_mean=None) -> torch.Tensor:
        """Quantize then dequantize back to model space, in ``x.dtype``: what attention sees."""
        if self.kind == "auto":
            return x
        enc = self.encode(x, is_key=is_key, k_mean=k_mean)
        return self.decode(enc, is_key=is_key, k_mean=k_mean, dtype=x.dtype)


_EXTRA: dict[str, Callable[[str], object]] = {}


def register_method(prefix: str, factory: Callable[[str], object]) -> None:
    """Register a method family: names starting with ``prefix`` are built by ``factory(name)``."""
    _EXTRA[prefix] = factory


def available_methods() -> list[str]:
    """Human-readable list of the accepted method names/patterns."""
    return BUILTIN_NAMES + sorted(f"{p}..." for p in _EXTRA)


def _unknown(name: str, why: str) -> ValueError:
    return ValueError(
        f"unknown KV cache method {name!r}: {why}. Valid: {', '.join(available_methods())}"
    )


def parse_method(name: str, head_dim: int | None = None):
    """Parse a method name; with ``head_dim`` also resolve and validate it.

    >>> parse_method("int4-kc-bdr128").name
    'int4-bdr128-kc'
    """
    if not isinstance(name, str) or not name.strip():
        raise _unknown(str(name), "empty name")
    key = name.strip().lower()
    if key == "saw-int4":
        from sawkv.quant.recipe import SAW_INT4  # recipe imports this module

        return SAW_INT4
    for prefix, factory in _EXTRA.items():
        if key.startswith(prefix):
            m = factory(key)
            return m.resolve(head_dim) if head_dim is not None else m
    if key in ("auto", "fp8"):
        m = KVMethod(kind=key, bits=8 if key == "fp8" else 16)
    elif key in FLOAT_DTYPES:
        m = KVMethod(kind="float", bits=16, dtype_name=key)
    else:
        m = _parse_int(key, name)
    return m.resolve(head_dim) if head_dim is not None else m


def _parse_int(key: str, name: str) -> KVMethod:
    head, *suffixes = key.split("-")
    mt = _INT_RE.match(head)
    if not mt:
        raise _unknown(name, f"{head!r} is not a method family")
    bits = int(mt.group(1))
    if bits not in INT_BITS:
        raise _unknown(name, f"int{bits} is not supported (bits must be one of {INT_BITS})")
    fields: dict = {}
    for s in suffixes:
        if not _SUFFIX_RE.match(s):
            raise _unknown(
                name, f"suffix {'-' + s!r} is not one of -g{{G}}, -bdr[{{b}}], -kv, -kc, -kh"
            )
        field = {"g": "group_size", "b": "had_block", "k": s}[s[0]]
        if field in fields:
            raise _unknown(name, f"suffix {'-' + s!r} given twice")
        if s[0] == "g":
            fields[field] = int(s[1:])
        elif s[0] == "b":
            fields[field] = int(s[3:]) if len(s) > 3 else -1
        else:
            fields[field] = True
    if fields.get("kv") and "had_block" not in fields:
        raise _unknown(name, "'-kv' rotates values too and needs '-bdr'")
    if fields.get("kh") and "group_size" in fields:
        raise _unknown(
            name,
            "'-kh' (one (scale, min) per half of each key) cannot be combined with '-g{G}', "
            "which already sets the metadata groups of keys and values",
        )
    return KVMethod(
        kind="int",
        bits=bits,
        group_size=fields.get("group_size"),
        had_block=fields.get("had_block"),
        rotate_v=fields.get("kv", False),
        center_k=fields.get("kc", False),
        k_half_meta=fields.get("kh", False),
    )
