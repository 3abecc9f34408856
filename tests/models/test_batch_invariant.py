"""``batch_invariant_linear``: each output row is bit-identical to that row computed alone,
wherever it sits in a tile and however many tiles the batch has; and equal to ``F.linear``
within fp32 rounding (it is the same product, only tiled)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sawkv.config import EngineConfig
from sawkv.models.batch_invariant import TILE_ROWS, batch_invariant_linear


@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 576), (576, 4096)])
@pytest.mark.parametrize("bias", [False, True])
def test_rows_do_not_depend_on_the_batch(in_features, out_features, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    b = torch.randn(out_features, generator=g) if bias else None
    x = torch.randn(300, in_features, generator=g)
    alone = torch.cat([batch_invariant_linear(x[i : i + 1], w, b) for i in range(len(x))])
    for num_rows in (2, 7, TILE_ROWS, TILE_ROWS + 1, 100, 300):
        for start in (0, 3, len(x) - num_rows):
            rows = batch_invariant_linear(x[start : start + num_rows], w, b)
            assert torch.equal(rows, alone[start : start + num_rows]), (num_rows, start)
    torch.testing.assert_close(alone, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_leading_dims_and_empty_input():
    w = torch.randn(8, 4)
    x = torch.randn(2, 3, 4)
    assert torch.equal(
        batch_invariant_linear(x, w), batch_invariant_linear(x.view(6, 4), w).view(2, 3, 8)
    )
    assert batch_invariant_linear(torch.empty(0, 4), w).shape == (0, 8)


def test_config_default_and_refusal():
    cpu = EngineConfig(model="m", device="cpu")
    assert cpu.is_batch_invariant
    assert not EngineConfig(model="m", device="cpu", batch_invariant=False).is_batch_invariant
    assert not EngineConfig(model="m", device="cuda").is_batch_invariant
    with pytest.raises(ValueError, match="batch_invariant needs a CPU engine"):
        EngineConfig(model="m", device="cuda", batch_invariant=True)
