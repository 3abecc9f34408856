"""Blocks shared by the model files: norms, rotary embedding, fused linears, MLP, attention.

Tensors are flat over tokens: hidden ``[num_tokens, hidden_size]``, heads ``[num_tokens, H, d]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sawkv.attention.backend import AttentionBackend, StepContext
from sawkv.cache.kv_cache import LayerKV
from sawkv.config import ModelConfig
from sawkv.models.batch_invariant import batch_invariant_linear


# ---- pure functions: eager, or fused by torch.compile on CUDA (decode is launch-bound) ----------
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """``x / rms(x) * (offset + w)`` in fp32, cast back (HF's rounding order)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:  # Gemma scales in fp32
        return (xf * (offset + w.float())).to(dtype)
    return w * xf.to(dtype)


def add_rms_norm(x, residual, w, eps: float, offset: float):
    """``(rms_norm(x + residual), x + residual)``: one fused kernel when compiled."""
    s = x + residual
    return rms_norm(s, w, eps, offset), s


def rope(positions, q, k, cos_sin):
    """Neox-style rotary embedding of ``q [T, Hq, d]`` and ``k [T, Hkv, d]``."""
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)


def qk_norm_rope(positions, q, k, cos_sin, qw, kw, eps: float, offset: float):
    """Per-head RMSNorm of q and k (Qwen3, Gemma3), then rotary embedding."""
    return rope(positions, rms_norm(q, qw, eps, offset), rms_norm(k, kw, eps, offset), cos_sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _Ops:
    """The functions above, eager or compiled (one compiled graph per function, dynamic in
    the token count, shared by every layer), and the linear every projection calls: plain
    ``F.linear``, or :func:`batch_invariant_linear` (see :mod:`sawkv.models.batch_invariant`)."""

    def __init__(self, compiled: bool, batch_invariant: bool = False) -> None:
        names = ("rms_norm", "add_rms_norm", "rope", "qk_norm_rope", "silu_mul")
        for name in names:
            fn = globals()[name]
            setattr(self, name, torch.compile(fn, dynamic=True) if compiled else fn)
        self.linear = batch_invariant_linear if batch_invariant else F.linear


EAGER_OPS = _Ops(False)
BATCH_INVARIANT_OPS = _Ops(False, batch_invariant=True)
_COMPILED_OPS: list[_Ops] = []


def compiled_ops() -> _Ops:
    if not _COMPILED_OPS:
        _COMPILED_OPS.append(_Ops(True))
    return _COMPILED_OPS[0]


def use_compiled_ops(model: nn.Module) -> None:
    """Switch every layer of ``model`` to the torch.compile'd fused functions (CUDA only)."""
    _set_ops(model, compiled_ops())


def use_batch_invariant_ops(model: nn.Module) -> None:
    """Make every projection and the LM head of ``model`` batch invariant (CPU engines)."""
    _set_ops(model, BATCH_INVARIANT_OPS)


def _set_ops(model: nn.Module, ops: _Ops) -> None:
    for mod in model.modules():
        if hasattr(mod, "ops"):
            mod.ops = ops


class RMSNorm(nn.Module):
    """``x / rms(x) * (offset + w)`` in fp32, cast back. ``offset`` is 1 for Gemma (weights
    are stored as w - 1), 0 for Llama/Qwen. With ``residual`` it adds first and returns
    ``(normed, sum)``."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0.0 else torch.zeros(dim))
        self.eps, self.offset = eps, offset
        self.ops = EAGER_OPS

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps, self.offset)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps, self.offset)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` fp32 with "linear" or "llama3" scaling."""
    # fp32 like transformers, so greedy outputs can match it token for token
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / scaling["factor"]).float()
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > old_len / lo, inv / factor, inv)
        is_mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        return torch.where(is_mid, mid, out).float()
    raise ValueError(f"RoPE scaling type {kind!r} is not supported (default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves) from a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict) -> None:
        super().__init__()
        inv = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)

    def forward(self, positions, q, k):
        """``positions [T]``, ``q [T, Hq, d]``, ``k [T, Hkv, d]`` -> rotated (q, k)."""
        return rope(positions, q, k, self.cos_sin)


def _apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Linear(nn.Linear):
    """``nn.Linear`` through ``self.ops.linear``, so a model can switch to batch-invariant
    GEMMs (:func:`use_batch_invariant_ops`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.ops = EAGER_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class FusedLinear(Linear):
    """One matmul for several projections concatenated on the output dim (q|k|v, gate|up).

    ``out_sizes`` tells the loader where each HF shard goes.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.out_sizes = list(out_sizes)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inter: int, act: str) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} is not supported; valid: {sorted(ACTIVATIONS)}")
        self.gate_up_proj = FusedLinear(hidden, [inter, inter], bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)
        self.act = ACTIVATIONS[act]
        self.is_silu = act == "silu"
        self.ops = EAGER_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        if self.is_silu:
            return self.down_proj(self.ops.silu_mul(h))
        gate, up = h.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Attention(nn.Module):
    """Self-attention over the paged cache. ``self.kv`` is bound by the model runner."""

    def __init__(
        self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend, rope: RotaryEmbedding
    ) -> None:
        super().__init__()
        d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.head_dim, self.num_heads, self.num_kv_heads = d, hq, hkv
        self.qkv_proj = FusedLinear(cfg.hidden_size, [hq * d, hkv * d, hkv * d], cfg.attention_bias)
        self.o_proj = Linear(hq * d, cfg.hidden_size, bias=False)
        offset = 1.0 if cfg.architecture == "gemma3" else 0.0
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, offset) if cfg.qk_norm else None
        self.layer_idx, self.scale = layer_idx, cfg.attn_scale
        self.backend, self.rope = backend, rope
        self.kv: LayerKV | None = None
        self.ops = EAGER_OPS
        # key smoothing of a saw-int4 recipe (set_key_scale): q * s and k / s after RoPE
        self.q_mul: torch.Tensor | None = None
        self.k_mul: torch.Tensor | None = None

    def set_key_scale(self, k_scale: torch.Tensor | None) -> None:
        """Read queries as ``q * s`` and hand the cache ``k / s`` (``k_scale [Hkv, d]``, this
        module's KV heads; None turns it off). Scores ``q . k`` are unchanged; the cache
        quantizes the smoothed keys (see :func:`sawkv.quant.recipe.smoothing_scales`)."""
        if k_scale is None:
            self.q_mul = self.k_mul = None
            return
        want = (self.num_kv_heads, self.head_dim)
        if tuple(k_scale.shape) != want:
            raise ValueError(f"key scale has shape {tuple(k_scale.shape)}, need {want}")
        w = self.qkv_proj.weight
        s = k_scale.to(device=w.device, dtype=torch.float32)
        group = self.num_heads // self.num_kv_heads
        self.q_mul = s.repeat_interleave(group, 0).to(w.dtype)
        self.k_mul = (1.0 / s).to(w.dtype)

    def forward(self, positions, x, ctx: StepContext) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1
        )
        q, k, v = q.view(t, -1, d), k.view(t, -1, d), v.view(t, -1, d)
        if self.q_norm is not None:
            qn, kn = self.q_norm, self.k_norm
            q, k = self.ops.qk_norm_rope(
                positions, q, k, self.rope.cos_sin, qn.weight, kn.weight, qn.eps, qn.offset
            )
        else:
            q, k = self.ops.rope(positions, q, k, self.rope.cos_sin)
        if self.q_mul is not None:  # in place: RoPE's outputs are fresh tensors
            q.mul_(self.q_mul)
            k.mul_(self.k_mul)
        # v stays a strided view of the qkv output: the write kernels take row strides
        o = self.backend.forward(q, k, v, self.kv, ctx, self.scale)
        return self.o_proj(o.reshape(t, -1))


def set_key_smoothing(model: nn.Module, k_scale: torch.Tensor | None) -> None:
    """Give every :class:`Attention` of ``model`` its layer's key smoothing
    (``k_scale [num_layers, num_kv_heads, head_dim]``, the KV heads this model holds)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_key_scale(None if k_scale is None else k_scale[module.layer_idx])
