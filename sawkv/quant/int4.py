"""Token-wise integer (INT2/3/4/8) and FP8 quantization of KV vectors, plus INT4 packing.

Conventions shared with the Triton kernels (``sawkv.kernels``), which must reproduce these
functions byte for byte up to float rounding:

* Asymmetric, per token x head (x group): ``x ~= code * scale + min``, codes in [0, 2**bits - 1].
* Metadata is fp16 ``(scale, min)`` stored as ``meta[..., num_groups, 2]``. Codes are computed
  against the *fp16-rounded* scale and min so that quantize and dequantize agree exactly.
* Rounding is ``floor(y + 0.5)`` (half up), which a kernel computes the same way everywhere.
* Defined behaviour for awkward inputs: NaN -> 0, +-Inf and finite values beyond fp16's range
  saturate to +-65504 (so metadata never becomes inf); a zero-range vector (all equal) gets
  scale 0 and codes 0 and dequantizes to its min exactly (up to fp16 rounding of min).
* INT4 packing: for a row of d codes, byte i holds code i in the low nibble and code i + d/2 in
  the high nibble, so unpacking yields two contiguous halves.
"""

from __future__ import annotations

import torch

FP16_MAX = 65504.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def sanitize(x: torch.Tensor) -> torch.Tensor:
    """fp32 copy of ``x`` with NaN -> 0 and everything clamped to [-65504, 65504]."""
    x = x.float()
    return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX).clamp(
        -FP16_MAX, FP16_MAX
    )


def _groups(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    d = x.shape[-1]
    g = d if group_size is None else group_size
    if g <= 0 or d % g:
        raise ValueError(f"group size {g} must divide the last dim {d}")
    return x.reshape(*x.shape[:-1], d // g, g)


def quantize_int(
    x: torch.Tensor, bits: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization over the last dim (or groups of it).

    Args:
        x: ``[..., d]`` any float dtype.
        bits: 2, 3, 4 or 8.
        group_size: elements sharing one (scale, min); default the whole last dim.
    Returns:
        codes ``[..., d]`` uint8 in [0, 2**bits - 1] (unpacked),
        meta ``[..., d // group_size, 2]`` fp16 holding (scale, min).
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 8, got {bits}")
    qmax = float(2**bits - 1)
    xg = _groups(sanitize(x), group_size)
    mn, mx = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    scale16 = ((mx - mn) / qmax).to(torch.float16)
    mn16 = mn.to(torch.float16)
    scale, mn = scale16.float(), mn16.float()
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)
    codes = torch.floor((xg - mn) * inv + 0.5).clamp_(0, qmax).to(torch.uint8)
    meta = torch.cat([scale16, mn16], -1)
    return codes.reshape(x.shape), meta


def dequantize_int(
    codes: torch.Tensor, meta: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_int`: codes ``[..., d]`` uint8 + meta ``[..., G, 2]``.

    The group size is ``d // G``.
    """
    d, num_groups = codes.shape[-1], meta.shape[-2]
    cg = codes.reshape(*codes.shape[:-1], num_groups, d // num_groups).float()
    m = meta.float()
    x = cg * m[..., 0:1] + m[..., 1:2]
    return x.reshape(codes.shape).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``[..., d]`` (uint8, values < 16) into bytes ``[..., d // 2]``.

    Byte i = code[i] | code[i + d/2] << 4.
    """
    d = codes.shape[-1]
    if d % 2:
        raise ValueError(f"INT4 packing needs an even last dim, got {d}")
    lo, hi = codes[..., : d // 2], codes[..., d // 2 :]
    return (lo & 0xF) | ((hi & 0xF) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: bytes ``[..., d // 2]`` -> codes ``[..., d]`` uint8."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 e4m3: ``x [..., d]`` -> (``float8_e4m3fn [..., d]``, fp32 scale ``[..., 1]``).

    scale = amax / 448 so the largest element maps to e4m3's largest finite value; an all-zero
    vector gets scale 0 and zeros.
    """
    xs = sanitize(x)
    scale = xs.abs().amax(-1, keepdim=True) / FP8_MAX
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)
    q = (xs * inv).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`."""
    return (q.float() * scale).to(dtype)
