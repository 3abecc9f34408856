"""k-means VQ: assignments are nearest centroids, fitting finds clusters, codebooks per head."""

from __future__ import annotations

import pytest
import torch

from sawkv.quant import parse_method
from sawkv.quant.kmeans import assign, kmeans_fit


def test_assignment_is_nearest_centroid():
    torch.manual_seed(0)
    pts, cent = torch.randn(3, 500, 2), torch.randn(3, 16, 2)
    got = assign(pts, cent, chunk=128)
    ref = torch.cdist(pts.double(), cent.double()).argmin(-1)
    d_got = (pts - torch.gather(cent, 1, got.unsqueeze(-1).expand(-1, -1, 2))).pow(2).sum(-1)
    d_ref = (pts - torch.gather(cent, 1, ref.unsqueeze(-1).expand(-1, -1, 2))).pow(2).sum(-1)
    torch.testing.assert_close(d_got, d_ref, atol=1e-5, rtol=0)  # equal up to exact ties


def test_fit_recovers_separated_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([[-10.0, 0.0], [0.0, 10.0], [10.0, 0.0], [0.0, -10.0]])
    pts = (centers[torch.arange(400) % 4] + 0.1 * torch.randn(400, 2)).unsqueeze(0)
    cb = kmeans_fit(pts, 4, iters=10, seed=1)[0]
    err = torch.cdist(centers, cb).min(-1).values
    assert err.max() < 0.1


def _kv(seed, n=256, h=2, d=16):
    torch.manual_seed(seed)
    return torch.randn(n, h, d) * torch.linspace(0.5, 3, d) + torch.linspace(-2, 2, d)


@pytest.mark.parametrize("name", ["kmeans2-d2", "kmeans3-d2-bdr16", "kmeans2-d4"])
def test_fake_quant_returns_nearest_codebook_entries(name):
    m = parse_method(name, 16)
    assert m.needs_calibration
    with pytest.raises(ValueError, match="not calibrated"):
        m.fake_quant_seq(_kv(0), is_key=True, layer_idx=0)
    m = m.fit([(_kv(0), _kv(1))], seed=0)
    x = _kv(2, n=50)
    y = m.fake_quant_seq(x, is_key=False, layer_idx=0)
    # reference: brute force over each head/position codebook, in the method's space
    s = m.sub_dim
    cb = m.codebooks[0][1]  # values
    xs = m._to_space(x)
    ys = m._to_space(y)  # rotation is its own inverse
    for h in range(2):
        for p in range(16 // s):
            sub = xs[:, h, p * s : (p + 1) * s]
            best = cb[h, p][torch.cdist(sub, cb[h, p]).argmin(-1)]
            torch.testing.assert_close(ys[:, h, p * s : (p + 1) * s], best, atol=1e-4, rtol=0)


def test_more_bits_less_error_and_bits_per_element():
    x_cal, x = (_kv(0), _kv(1)), _kv(3, n=100)
    errs = []
    for bits in (1, 2, 4):
        m = parse_method(f"kmeans{bits}-d2", 16).fit([x_cal])
        errs.append((m.fake_quant_seq(x, is_key=True, layer_idx=0) - x).pow(2).mean().item())
        assert m.bits_per_element(16) == bits
    assert errs[0] > errs[1] > errs[2]


def test_kmeans_names():
    assert parse_method("kmeans4").name == "kmeans4-d2"
    assert parse_method("kmeans4-bdr", 64).name == "kmeans4-d2-bdr64"
    for bad in ("kmeans7-d2", "kmeans4-x", "kmeans4-d2-d2"):  # 14 code bits is too many
        with pytest.raises(ValueError):
            parse_method(bad)
    with pytest.raises(ValueError):
        parse_method("kmeans2-d3", 64)
