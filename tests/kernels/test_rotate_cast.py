"""The one-pass rotate-and-cast kernel of the SDPA extend path against an fp64 rotation.

``rotate_cast`` replaces ``float() -> matmul -> clamp -> to(dtype)`` on the step's queries (and
on the output with rotated values). The reference is the oracle's butterfly rotation
(``sawkv.quant.hadamard.rotate``) in fp64, rounded once to the output dtype: the kernel sums
exact products in fp32, so at most one output ulp may differ where a value sits on a rounding
tie.
"""

from __future__ import annotations

import pytest
import torch

from sawkv.kernels.rotation import rotate_cast
from sawkv.quant.hadamard import rotate


def _expected(x: torch.Tensor, had_block: int, dtype: torch.dtype) -> torch.Tensor:
    y = rotate(x.double(), had_block) if had_block else x.double()
    if dtype == torch.float16:
        y = y.clamp(-65504.0, 65504.0)
    return y.to(dtype)


def _ulps(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    # distance in units of the output dtype's spacing at b; ``floor`` is the absolute error
    # the fp32 sums may make on values that cancel to near zero
    spacing = torch.finfo(b.dtype).eps * b.double().abs().clamp_min(torch.finfo(b.dtype).tiny)
    return (a.double() - b.double()).abs() / torch.maximum(spacing, torch.tensor(floor))


@pytest.mark.parametrize(
    "d, heads, had, x_dtype, out_dtype",
    [
        (128, 4, 128, torch.bfloat16, torch.float16),  # bf16 model's q -> fp16 SDPA
        (128, 3, 64, torch.float16, torch.float16),
        (64, 2, 16, torch.bfloat16, torch.bfloat16),
        (256, 2, 256, torch.bfloat16, torch.float16),
        (64, 5, 64, torch.float32, torch.float32),
        (128, 2, 128, torch.float16, torch.bfloat16),  # fp16 output rotated back into bf16
        (128, 4, 0, torch.bfloat16, torch.float16),  # no rotation: clamp and cast only
    ],
)
def test_rotate_cast_matches_fp64_rotation(d, heads, had, x_dtype, out_dtype):
    torch.manual_seed(0)
    # a strided query view ([T, Hq, d] cut out of a wider projection, as the model's q is)
    wide = (4 * torch.randn(21, heads + 3, d)).to(x_dtype)
    x = wide[:, 1 : heads + 1]
    out = torch.full(x.shape, float("nan"), dtype=out_dtype)
    rotate_cast(x, had, out)
    want = _expected(x, had, out_dtype)
    floor = 4 * torch.finfo(torch.float32).eps * x.double().abs().max().item() * max(had, 1) ** 0.5
    assert _ulps(out, want, floor).max() <= 1.0


def test_rotate_cast_clamps_to_fp16_keeps_nan_and_writes_only_out_rows():
    d, had = 64, 64
    x = torch.randn(16, 2, d, dtype=torch.bfloat16)
    x[0, 0] = 1e6  # rotates to 8e6 in its first coordinate: clamped to fp16's range
    x[1, 1, 5] = float("nan")  # NaN spreads over its Hadamard block, as in torch
    x[2, 0] = 0.0
    x[3, 1] = 7.0  # a constant vector: all its mass in the block's first coordinate
    out_full = torch.full((18, 2, d), -1.0, dtype=torch.float16)
    out = out_full[1:17]
    rotate_cast(x, had, out)
    assert out[0, 0].abs().max() == 65504.0
    assert out[1, 1].isnan().all() and not out[1, 0].isnan().any()
    assert (out[2, 0] == 0).all()
    assert out[3, 1, 0] == 7.0 * d**0.5 and (out[3, 1, 1:] == 0).all()
    assert (out_full[0] == -1).all() and (out_full[17] == -1).all()
    want = _expected(x, had, torch.float16)
    finite = want.isfinite() & out.isfinite()
    floor = 4 * torch.finfo(torch.float32).eps * 7.0 * d**0.5  # the finite rows' scale
    assert _ulps(out[finite], want[finite], floor).max() <= 1.0


def test_rotate_cast_rejects_bad_arguments_by_name():
    x = torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match="one shape"):
        rotate_cast(x, 64, torch.empty(4, 2, 32))
    with pytest.raises(ValueError, match="contiguous"):
        rotate_cast(x.transpose(1, 2).contiguous().transpose(1, 2), 64, torch.empty(4, 2, 64))
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        rotate_cast(x, 64, torch.empty(4, 2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="had_block"):
        rotate_cast(x, 48, torch.empty_like(x))
    with pytest.raises(ValueError, match="power of two"):
        rotate_cast(torch.randn(4, 2, 80), 16, torch.empty(4, 2, 80))


def test_rotate_cast_needs_cuda_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match="CUDA"):
        rotate_cast(x, 64, torch.empty_like(x))
