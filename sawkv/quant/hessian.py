"""Hessian-aware (GPTQ-style) error-compensated key quantization.

Name grammar: ``gptq{k}[-g{G}][-bdr[{b}]][-kc]``, k in {2, 3, 4, 8}: keys are centered (``-kc``)
and rotated (``-bdr``) exactly as ``int{k}[-g{G}][-bdr{b}][-kc]`` does, then quantized with GPTQ
on the same token-wise grid; values use plain token-wise ``int{k}[-g{G}]``. So
``gptq4-bdr64-kc`` vs ``int4-bdr64-kc`` isolates the error compensation.

Derivation (why the query second moment is the Hessian). A query q reads key k through the logit
``l = q.k / sqrt(d)``. Quantizing k to k + e changes the logit by ``q.e / sqrt(d)``; to first order
the attention output error is linear in the logit errors, so the quantity to minimise for one key
is the expected squared logit error over the queries that read it::

    E_q[(q.e)^2] = e^T E[q q^T] e = e^T H e,     H = E[q q^T]  (post-RoPE queries)

For GQA, H of a KV head averages the queries of all its query heads. In the rotated, centered
space the key is ``k' = R (k - mu)`` and ``q.k = (R q).k' + q.mu``: the shift ``q.mu`` is common
to all keys (softmax-invariant) and the error transforms as ``e' = R e``, so ``H' = R H R``.
``e^T H e`` is GPTQ's layer objective ``||X^T e||^2`` with the queries as the inputs X and the
key vector as one weight row, so GPTQ applies as is: quantize channels in order, and after each
channel spread its error over the remaining ones with the upper Cholesky factor U of H^-1::

    err_j = (w_j - Q(w_j)) / U_jj ;   w_{j+1:} -= err_j * U_{j, j+1:}

H is estimated on calibration windows (never evaluation text), damped by 1% of its mean
diagonal. The grid (fp16 scale, min per token x head x group) is fixed from the transformed key
before compensation; compensated values beyond it are clamped.

Bits per element: identical to ``int{k}[-g{G}]``: k + 32 / G (G = head_dim by default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

from sawkv.quant.hadamard import block_hadamard_matrix, check_had_block
from sawkv.quant.int4 import quantize_int
from sawkv.quant.methods import KVMethod

_GPTQ_RE = re.compile(r"^gptq(\d+)((?:-(?:g\d+|bdr\d*|kc))*)$")
DAMP = 0.01


@dataclass(frozen=True)
class GPTQMethod:
    """GPTQ-compensated keys (query second-moment Hessian), token-wise INT values."""

    bits: int = 4
    group_size: int | None = None
    had_block: int | None = None  # -1: bare -bdr
    center_k: bool = False
    # hessians[layer] = [num_kv_heads, head_dim, head_dim] E[q q^T] in model space
    hessians: tuple | None = field(default=None, compare=False, repr=False)

    is_servable = False
    token_wise = False
    seq_dependent = False

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"GPTQ bits must be one of 2, 3, 4, 8, got {self.bits}")

    @property
    def name(self) -> str:
        parts = [f"gptq{self.bits}"]
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if self.had_block is not None:
            parts.append("bdr" if self.had_block == -1 else f"bdr{self.had_block}")
        if self.center_k:
            parts.append("kc")
        return "-".join(parts)

    def __str__(self) -> str:
        return self.name

    @property
    def needs_calibration(self) -> bool:
        return self.hessians is None

    @property
    def center_k_needed(self) -> bool:
        return self.center_k

    def base(self) -> KVMethod:
        """The plain token-wise method on the same grid (used for values, and as reference)."""
        return KVMethod(
            kind="int",
            bits=self.bits,
            group_size=self.group_size,
            had_block=self.had_block,
            center_k=self.center_k,
        )

    def resolve(self, head_dim: int) -> GPTQMethod:
        m = self
        if m.had_block == -1:
            m = replace(m, had_block=min(128, head_dim))
        if m.had_block is not None:
            check_had_block(m.had_block, head_dim)
        m.base().resolve(head_dim)  # validates the group size
        return m

    def bits_per_element(self, head_dim: int, model_dtype_bits: int = 16) -> float:
        return self.base().bits_per_element(head_dim)

    def fit(self, hessians) -> GPTQMethod:
        """Attach per-layer query second moments ``[num_kv_heads, head_dim, head_dim]``."""
        return replace(self, hessians=tuple(h.float() for h in hessians))

    def fake_quant_seq(
        self, x: torch.Tensor, *, is_key: bool, layer_idx: int, k_mean=None, start: int = 0
    ) -> torch.Tensor:
        """``x [seq, H, d]`` -> what attention reads (model space), same shape and dtype."""
        base = self.base().resolve(x.shape[-1])
        if not is_key:
            return base.fake_quant(x, is_key=False)
        if self.hessians is None:
            raise ValueError(f"{self.name} is not calibrated: call .fit(hessians)")
        mu = k_mean if self.center_k else None
        xt = base.transform(x, is_key=True, k_mean=mu)  # [S, H, d] fp32, centered + rotated
        h = self.hessians[layer_idx].to(x.device)
        if self.had_block is not None:
            r = block_hadamard_matrix(x.shape[-1], self.had_block, device=x.device)
            h = r @ h @ r
        q = torch.stack(
            [gptq_quantize(xt[:, i], h[i], self.bits, self.group_size) for i in range(x.shape[1])],
            dim=1,
        )
        return base.untransform(q, is_key=True, k_mean=mu).to(x.dtype)


def grid_of(x: torch.Tensor, bits: int, group_size: int | None):
    """Per-element (scale, min) ``[N, d]`` each, of the token-wise grid of ``x [N, d]``."""
    _, meta = quantize_int(x, bits, group_size)  # [N, G, 2] fp16
    reps = x.shape[-1] // meta.shape[-2]
    meta = meta.float().repeat_interleave(reps, dim=-2)
    return meta[..., 0], meta[..., 1]


def round_to_grid(w, scale, mn, qmax: float) -> torch.Tensor:
    """Nearest grid point ``code * scale + min`` (codes clamped to [0, qmax]); scale 0 -> min."""
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)
    return torch.floor((w - mn) * inv + 0.5).clamp(0, qmax) * scale + mn


def gptq_quantize(
    x: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None
) -> torch.Tensor:
    """GPTQ-quantize rows of ``x [N, d]`` under the objective ``e^T H e`` per row.

    Args:
        x: ``[N, d]`` rows (keys of one head, already transformed).
        hessian: ``[d, d]`` symmetric PSD second moment of the queries (same space as x).
    Returns:
        ``[N, d]`` fp32 dequantized values on the token-wise grid of :func:`grid_of`.
    """
    d = x.shape[-1]
    w = x.double().clone()
    scale, mn = (t.double() for t in grid_of(x, bits, group_size))
    h = hessian.double()
    damp = DAMP * h.diagonal().mean().clamp(min=1e-8)
    h = h + damp * torch.eye(d, dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    qmax = float(2**bits - 1)
    for j in range(d):
        out[:, j] = round_to_grid(w[:, j], scale[:, j], mn[:, j], qmax)
        err = (w[:, j] - out[:, j]) / u[j, j]
        w[:, j + 1 :] -= err[:, None] * u[j, j + 1 :][None, :]
    return out.float()


def weighted_error(x: torch.Tensor, xq: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``e^T H e`` with ``e = xq - x``: the calibration objective."""
    e = (xq - x).double()
    return ((e @ hessian.double()) * e).sum(-1).mean()


def parse_gptq(name: str) -> GPTQMethod:
    """``gptq4``, ``gptq4-bdr64-kc``, ``gptq3-g32`` -> :class:`GPTQMethod`."""
    m = _GPTQ_RE.match(name)
    if not m:
        raise ValueError(
            f"bad GPTQ method name {name!r}: expected gptq{{k}}[-g{{G}}][-bdr[{{b}}]][-kc]"
        )
    fields: dict = {}
    for part in filter(None, m.group(2).split("-")):
        if part == "kc":
            key, val = "center_k", True
        elif part.startswith("g"):
            key, val = "group_size", int(part[1:])
        else:
            key, val = "had_block", (int(part[3:]) if len(part) > 3 else -1)
        if key in fields:
            raise ValueError(f"bad GPTQ method name {name!r}: -{part} given twice")
        fields[key] = val
    return GPTQMethod(bits=int(m.group(1)), **fields)
