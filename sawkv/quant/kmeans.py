"""k-means vector quantization (product quantization) of K/V sub-vectors.

Name grammar: ``kmeans{b}[-d{s}][-bdr[{blk}]]``: ``b`` bits per element, sub-vectors of ``s``
channels (default 2), so each sub-vector is one code of ``b * s`` bits, an index into a codebook
of ``2 ** (b * s)`` centroids. ``-bdr`` rotates K *and* V with the block-diagonal Hadamard
(bare ``-bdr``: min(128, head_dim)) before fitting and encoding, and back after decoding.

What exactly is implemented (evaluation-only fake-quant; codes would be ``b * s`` bits each):

* One codebook per (layer, K or V, KV head, sub-vector position): ``[2**(b*s), s]`` centroids,
  fitted with Lloyd's k-means (seeded random init, fixed iterations) on K/V of *calibration*
  windows. Per-position codebooks learn each channel pair's offset and spread, so no per-token
  (scale, min) is stored.
* Encoding a vector = for every sub-vector, the index of the nearest centroid (squared L2);
  decoding = looking the centroids up.

Bits per element: exactly ``b`` per token (no per-token metadata). The codebooks are a fixed
per-model cost of ``2 ** (b*s) * head_dim * 2`` bytes (fp16) per (layer, K/V, head), e.g. 32 KiB
at b=4, s=2, d=64 -- independent of the number of tokens, so not counted in bits per element.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

from sawkv.quant.hadamard import check_had_block, rotate

_KM_RE = re.compile(r"^kmeans(\d+)((?:-(?:d\d+|bdr\d*))*)$")
MAX_CODE_BITS = 12  # 4096 centroids: beyond that fitting on CPU calibration data is pointless


@dataclass(frozen=True)
class KMeansMethod:
    """Product quantization with per-(layer, K/V, head, position) codebooks."""

    bits: int = 4
    sub_dim: int = 2
    had_block: int | None = None  # -1: bare -bdr, settled by resolve()
    iters: int = 10  # Lloyd iterations after k-means++ seeding (CPU-sized)
    # codebooks[layer] = (k_cb, v_cb), each [num_kv_heads, head_dim // sub_dim, C, sub_dim]
    codebooks: tuple | None = field(default=None, compare=False, repr=False)

    is_servable = False
    token_wise = False
    seq_dependent = False  # every token is encoded on its own: the cache may encode once

    def __post_init__(self):
        if self.bits <= 0 or self.sub_dim <= 0 or self.bits * self.sub_dim > MAX_CODE_BITS:
            raise ValueError(
                f"k-means needs bits*sub_dim in 1..{MAX_CODE_BITS}, got "
                f"bits={self.bits} sub_dim={self.sub_dim}"
            )

    @property
    def name(self) -> str:
        s = f"kmeans{self.bits}-d{self.sub_dim}"
        if self.had_block is not None:
            s += "-bdr" if self.had_block == -1 else f"-bdr{self.had_block}"
        return s

    def __str__(self) -> str:
        return self.name

    @property
    def num_centroids(self) -> int:
        return 2 ** (self.bits * self.sub_dim)

    @property
    def needs_calibration(self) -> bool:
        return self.codebooks is None

    def resolve(self, head_dim: int) -> KMeansMethod:
        m = self
        if m.had_block == -1:
            m = replace(m, had_block=min(128, head_dim))
        if m.had_block is not None:
            check_had_block(m.had_block, head_dim)
        if head_dim % m.sub_dim:
            raise ValueError(f"k-means sub-vector size {m.sub_dim} does not divide {head_dim}")
        return m

    def bits_per_element(self, head_dim: int, model_dtype_bits: int = 16) -> float:
        return float(self.bits)

    def _to_space(self, x: torch.Tensor) -> torch.Tensor:
        return rotate(x.float(), self.had_block) if self.had_block is not None else x.float()

    # ---- fitting ------------------------------------------------------------------------
    def fit(self, kv_per_layer, seed: int = 0) -> KMeansMethod:
        """Fit all codebooks.

        Args:
            kv_per_layer: sequence over layers of ``(k, v)``, each ``[num_tokens, H, head_dim]``
                from calibration windows (never evaluation text).
        Returns:
            a copy of this method holding the codebooks.
        """
        books = []
        for k, v in kv_per_layer:
            self.resolve(k.shape[-1])
            books.append(tuple(self._fit_tensor(t, seed) for t in (k, v)))
        return replace(self, codebooks=tuple(books))

    def _fit_tensor(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        n, h, d = x.shape
        pts = self._to_space(x).reshape(n, h * d // self.sub_dim, self.sub_dim).transpose(0, 1)
        cb = kmeans_fit(pts, self.num_centroids, self.iters, seed)  # [H*P, C, s]
        return cb.reshape(h, d // self.sub_dim, self.num_centroids, self.sub_dim)

    # ---- encode / decode ----------------------------------------------------------------
    def encode(self, x: torch.Tensor, *, is_key: bool, layer_idx: int) -> torch.Tensor:
        """``x [seq, H, d]`` -> codes ``[seq, H, d // s]`` int64 (nearest centroids)."""
        cb = self._codebook(is_key, layer_idx).to(x.device)
        n, h, d = x.shape
        pts = self._to_space(x).reshape(n, h * d // self.sub_dim, self.sub_dim).transpose(0, 1)
        codes = assign(pts, cb.reshape(-1, self.num_centroids, self.sub_dim))  # [H*P, n]
        return codes.transpose(0, 1).reshape(n, h, d // self.sub_dim)

    def decode(self, codes: torch.Tensor, *, is_key: bool, layer_idx: int) -> torch.Tensor:
        """codes ``[seq, H, P]`` -> ``[seq, H, P * s]`` fp32 in model space."""
        cb = self._codebook(is_key, layer_idx).to(codes.device)  # [H, P, C, s]
        n, h, p = codes.shape
        idx = codes.permute(1, 2, 0).unsqueeze(-1).expand(h, p, n, self.sub_dim)
        x = torch.gather(cb, 2, idx).permute(2, 0, 1, 3).reshape(n, h, p * self.sub_dim)
        return rotate(x, self.had_block) if self.had_block is not None else x

    def _codebook(self, is_key: bool, layer_idx: int) -> torch.Tensor:
        if self.codebooks is None:
            raise ValueError(f"{self.name} is not calibrated: call .fit(...) (sawkv.eval.study)")
        return self.codebooks[layer_idx][0 if is_key else 1]

    def fake_quant_seq(
        self, x: torch.Tensor, *, is_key: bool, layer_idx: int, k_mean=None, start: int = 0
    ) -> torch.Tensor:
        """``x [seq, H, d]`` -> nearest-centroid reconstruction, same shape and dtype."""
        codes = self.encode(x, is_key=is_key, layer_idx=layer_idx)
        return self.decode(codes, is_key=is_key, layer_idx=layer_idx).to(x.dtype)


def assign(points: torch.Tensor, centroids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Nearest centroid (squared L2) for each point, per independent problem.

    Args:
        points: ``[B, N, s]``; centroids: ``[B, C, s]``.
    Returns:
        ``[B, N]`` int64 indices; ties go to the lowest index.
    """
    out = []
    c2 = (centroids * centroids).sum(-1).unsqueeze(1)  # [B, 1, C]
    for i in range(0, points.shape[1], chunk):
        p = points[:, i : i + chunk]
        # |p - c|^2 = |p|^2 - 2 p.c + |c|^2; |p|^2 is shared by all centroids of a point.
        dist = c2 - 2 * torch.bmm(p, centroids.transpose(1, 2))
        out.append(dist.argmin(-1))
    return torch.cat(out, dim=1)


def kmeans_fit(points: torch.Tensor, num_centroids: int, iters: int, seed: int = 0):
    """Batched Lloyd's k-means.

    Args:
        points: ``[B, N, s]`` fp32, B independent problems sharing N.
    Returns:
        centroids ``[B, C, s]``. Init: k-means++ (:func:`kmeans_pp_init`); an empty cluster
        keeps its previous centroid.
    """
    b, n, s = points.shape
    cent = kmeans_pp_init(points, num_centroids, torch.Generator().manual_seed(seed))
    for _ in range(iters):
        a = assign(points, cent)  # [B, N]
        sums = torch.zeros_like(cent).scatter_add_(1, a.unsqueeze(-1).expand(b, n, s), points)
        ones = torch.ones(b, n, device=points.device)
        counts = torch.zeros(b, num_centroids, device=points.device).scatter_add_(1, a, ones)
        filled = counts > 0
        cent = torch.where(filled.unsqueeze(-1), sums / counts.clamp(min=1).unsqueeze(-1), cent)
    return cent


def kmeans_pp_init(points: torch.Tensor, num_centroids: int, gen: torch.Generator):
    """k-means++ seeding, batched: each next centroid is a point drawn with probability
    proportional to its squared distance to the nearest centroid so far.

    Args:
        points: ``[B, N, s]``. Returns ``[B, C, s]``.
    """
    b, n, _ = points.shape
    dev = points.device  # the generator lives on the CPU: draws move to the points' device
    rows = torch.arange(b, device=dev)
    first = torch.randint(n, (b,), generator=gen).to(dev)
    cent = [points[rows, first]]
    d2 = (points - cent[0].unsqueeze(1)).pow(2).sum(-1)  # [B, N]
    for _ in range(num_centroids - 1):
        # all-zero weights (fewer distinct points than centroids): fall back to uniform
        w = torch.where(d2.sum(-1, keepdim=True) > 0, d2, torch.ones_like(d2))
        cdf = w.cumsum(-1)  # inverse-CDF sampling: much cheaper than torch.multinomial
        u = torch.rand(b, 1, generator=gen).to(dev) * cdf[:, -1:]
        nxt = torch.searchsorted(cdf, u).squeeze(-1).clamp(max=n - 1)
        cent.append(points[rows, nxt])
        d2 = torch.minimum(d2, (points - cent[-1].unsqueeze(1)).pow(2).sum(-1))
    return torch.stack(cent, dim=1)


def parse_kmeans(name: str) -> KMeansMethod:
    """``kmeans4``, ``kmeans4-d2``, ``kmeans2-d4-bdr64`` -> :class:`KMeansMethod`."""
    m = _KM_RE.match(name)
    if not m:
        raise ValueError(
            f"bad k-means method name {name!r}: expected kmeans{{b}}[-d{{s}}][-bdr[{{block}}]]"
        )
    fields: dict = {}
    for part in filter(None, m.group(2).split("-")):
        key = "sub_dim" if part[0] == "d" else "had_block"
        if key in fields:
            raise ValueError(f"bad k-means method name {name!r}: -{part} given twice")
        if key == "sub_dim":
            fields[key] = int(part[1:])
        else:
            fields[key] = int(part[3:]) if len(part) > 3 else -1
    return KMeansMethod(bits=int(m.group(1)), **fields)
