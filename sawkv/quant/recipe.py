"""``saw-int4``: a calibrated per-layer KV format (a *recipe*) and the default method name.

A :class:`Recipe` gives every layer its own servable token-wise format (an ordinary
:class:`~sawkv.quant.methods.KVMethod`): INT4 with Hadamard block b (or none), K-only or K+V
rotation, key centering on or off, or INT8 for the few layers that are most sensitive. It also
carries the calibrated key means (``-kc``), so one file holds everything a cache needs::

    ~/.cache/sawkv/<model>/saw_int4_recipe.safetensors
        tensor  "k_means"  [num_layers, num_kv_heads, head_dim] fp32
        tensor  "k_scale"  [num_layers, num_kv_heads, head_dim] fp32 (optional key smoothing)
        metadata "recipe"   JSON: layer method names, head_dim, budget, calibration info

``parse_method("saw-int4")`` gives :data:`SAW_INT4` (a :class:`SawInt4` placeholder); the cache
or engine that knows the model replaces it by the model's recipe (``sawkv calibrate`` builds it,
and it is built on first use). Models without weights (dummy presets) have no statistics to
calibrate on: they use :data:`SAW_INT4_FALLBACK`, a fixed method.

Everything here is pure torch and servable: importing it never loads an evaluation baseline.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sawkv.defaults import DEFAULT_KV_METHOD  # noqa: F401  re-exported
from sawkv.quant.methods import KVMethod, parse_method

SAW_INT4_NAME = "saw-int4"
# What saw-int4 means where no recipe can exist (dummy weights: no key statistics, so no
# centering): INT4 with a Hadamard block of min(128, head_dim) on keys and values.
SAW_INT4_FALLBACK = "int4-bdr-kv"
RECIPE_FILE = "saw_int4_recipe.safetensors"
# Default budget: this many bits per element above plain per-token INT4 of the head_dim.
BUDGET_MARGIN = 0.25


def plain_int4_bits(head_dim: int) -> float:
    """Bits per element of per-token INT4 with one fp16 (scale, min) pair: ``4 + 32 / d``."""
    return 4.0 + 32.0 / head_dim


def default_budget(head_dim: int) -> float:
    """The default recipe budget: 4.75 at d=64, 4.5 at d=128, 4.375 at d=256."""
    return plain_int4_bits(head_dim) + BUDGET_MARGIN


# Key smoothing scales are kept within [1/256, 256] of their geometric mean: a channel no query
# reads (or no key uses) would otherwise get an infinite (or zero) scale.
SMOOTH_CLAMP = 256.0


def smoothing_scales(q_energy: torch.Tensor, k_energy: torch.Tensor) -> torch.Tensor:
    """Per-channel key smoothing ``s`` that minimizes the expected error of ``q . k`` when keys
    are quantized as ``k / s`` and queries read as ``q * s``.

    With quantization noise on ``k / s`` of variance proportional to ``sum_i b_i / s_i^2``
    (after a Hadamard rotation the noise is spread evenly over channels), the error of the
    score has variance ``(sum_i a_i s_i^2)(sum_i b_i / s_i^2)``; Cauchy-Schwarz gives the
    minimum ``(sum_i sqrt(a_i b_i))^2`` at ``s_i = (b_i / a_i)^(1/4)``. Channels ``i`` and
    ``i + d/2`` (one rotary pair) share a scale, so smoothing commutes with RoPE.

    Args:
        q_energy: ``[..., head_dim]`` mean ``q_i^2`` (over tokens and the query heads that read
            one KV head), post-RoPE.
        k_energy: ``[..., head_dim]`` mean ``(k_i - mu_i)^2`` of the centered keys, post-RoPE.
    Returns:
        ``[..., head_dim]`` fp32 scales, geometric mean 1 over the last dim, within
        ``[1/SMOOTH_CLAMP, SMOOTH_CLAMP]``.
    """
    if q_energy.shape != k_energy.shape or q_energy.shape[-1] % 2:
        raise ValueError(
            f"q_energy {tuple(q_energy.shape)} and k_energy {tuple(k_energy.shape)} must have "
            "one shape with an even head_dim"
        )
    a, b = q_energy.double(), k_energy.double()
    if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("query/key energies must be finite")
    h = a.shape[-1] // 2
    a = (a[..., :h] + a[..., h:]).clamp_min(0)
    b = (b[..., :h] + b[..., h:]).clamp_min(0)
    tiny = torch.finfo(torch.float32).tiny
    log_s = 0.25 * (torch.log(b + tiny) - torch.log(a + tiny))
    log_s = log_s - log_s.mean(-1, keepdim=True)
    lim = math.log(SMOOTH_CLAMP)
    s = log_s.clamp(-lim, lim).exp().float()
    return torch.cat([s, s], dim=-1)


@dataclass(frozen=True)
class SawInt4:
    """The name ``saw-int4`` before it is tied to a model (see :func:`Recipe.load`).

    Satisfies the method protocol loosely: it resolves to itself and reports the default
    budget as its nominal bits per element; caches replace it by the model's :class:`Recipe`.
    """

    name: str = SAW_INT4_NAME
    kind: str = "recipe"
    is_servable = True
    is_quantized = True
    center_k = False  # the recipe carries its own key means
    rotate_v = False
    needs_calibration = True

    def __str__(self) -> str:
        return self.name

    def resolve(self, head_dim: int) -> SawInt4:
        return self

    def bits_per_element(self, head_dim: int, model_dtype_bits: int = 16) -> float:
        return default_budget(head_dim)


SAW_INT4 = SawInt4()


def is_saw_int4(method) -> bool:
    """True for the name ``saw-int4`` or its unresolved placeholder."""
    if isinstance(method, str):
        return method.strip().lower() == SAW_INT4_NAME
    return isinstance(method, SawInt4)


def check_layer_method(m: KVMethod, head_dim: int) -> KVMethod:
    """Resolve ``m`` and refuse formats the paged engine cannot serve per layer."""
    m = m.resolve(head_dim)
    if not (m.kind == "int" and m.bits in (4, 8) and m.group_size is None):
        raise ValueError(
            f"recipe layer format {m.name!r} is not servable: a layer must be "
            "int4 or int8 [-bdr{b}][-kv][-kc][-kh] without a group size"
        )
    return m


@dataclass(frozen=True)
class Recipe:
    """Per-layer KV formats of one model, plus its key means.

    Args:
        layers: one resolved servable :class:`KVMethod` per layer (INT4 or INT8, token-wise).
        head_dim, num_kv_heads: the model's attention shape.
        k_means: ``[num_layers, num_kv_heads, head_dim]`` fp32 key means (layers whose format
            has ``-kc`` subtract them), or None when no layer centers keys.
        budget: the bits per element the calibration was allowed (metadata included).
        info: calibration facts (texts, tokens, sensitivities), JSON-serializable.
        num_sink: each sequence's first ``num_sink`` tokens are kept exact, in the model dtype
            (attention sinks; ``sawkv.kernels.sinks``), as calibration chose.
            Per sequence, not per element, so :meth:`bits_per_element` leaves them out.
        k_scale: ``[num_layers, num_kv_heads, head_dim]`` fp32 key smoothing, or None. The
            cache stores ``k / k_scale`` and attention reads queries ``q * k_scale`` (exact:
            ``q . k`` is unchanged), so channels where keys are large and queries small are
            quantized more coarsely (:func:`smoothing_scales`). With it, ``k_means`` are means
            of ``k / k_scale``: what the cache receives.
    """

    layers: tuple[KVMethod, ...]
    head_dim: int
    num_kv_heads: int
    k_means: torch.Tensor | None = field(default=None, compare=False, repr=False)
    budget: float | None = None
    info: dict = field(default_factory=dict, compare=False, repr=False)
    num_sink: int = 0
    k_scale: torch.Tensor | None = field(default=None, compare=False, repr=False)

    name = SAW_INT4_NAME
    kind = "recipe"
    is_servable = True
    is_quantized = True
    needs_calibration = False
    # protocol flags of sawkv.quant.protocol.SeqMethod (encoded once per token, per layer)
    seq_dependent = False
    token_wise = True

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a recipe needs at least one layer")
        if not 0 <= self.num_sink <= 16:
            raise ValueError(f"a recipe keeps 0 to 16 sink tokens, got {self.num_sink}")
        object.__setattr__(
            self, "layers", tuple(check_layer_method(m, self.head_dim) for m in self.layers)
        )
        if self.k_means is not None:
            want = (len(self.layers), self.num_kv_heads, self.head_dim)
            if tuple(self.k_means.shape) != want:
                raise ValueError(
                    f"recipe key means have shape {tuple(self.k_means.shape)}, need {want}"
                )
        elif any(m.center_k for m in self.layers):
            raise ValueError("recipe layers center keys (-kc) but no key means were given")
        if self.k_scale is not None:
            want = (len(self.layers), self.num_kv_heads, self.head_dim)
            if tuple(self.k_scale.shape) != want:
                raise ValueError(
                    f"recipe key scales have shape {tuple(self.k_scale.shape)}, need {want}"
                )
            if not bool(torch.isfinite(self.k_scale).all() and (self.k_scale > 0).all()):
                raise ValueError("recipe key scales must be finite and > 0")
        if self.budget is not None and self.bits_per_element() > self.budget + 1e-9:
            raise ValueError(
                f"recipe uses {self.bits_per_element():.4f} bits per element, over its budget "
                f"of {self.budget:.4f}"
            )

    def __str__(self) -> str:
        return self.name

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def center_k(self) -> bool:
        return any(m.center_k for m in self.layers)

    def layer_method(self, layer_idx: int) -> KVMethod:
        return self.layers[layer_idx]

    def layer_key_mean(self, layer_idx: int) -> torch.Tensor | None:
        """``[num_kv_heads, head_dim]`` key mean of a ``-kc`` layer, else None."""
        if not self.layers[layer_idx].center_k:
            return None
        return self.k_means[layer_idx]

    def layer_key_scale(self, layer_idx: int) -> torch.Tensor | None:
        """``[num_kv_heads, head_dim]`` key smoothing of layer ``layer_idx`` (None: none)."""
        return None if self.k_scale is None else self.k_scale[layer_idx]

    def resolve(self, head_dim: int) -> Recipe:
        if head_dim != self.head_dim:
            raise ValueError(f"recipe is for head_dim {self.head_dim}, not {head_dim}")
        return self

    def bits_per_element(self, head_dim: int | None = None, model_dtype_bits: int = 16) -> float:
        """Average over layers of each layer's bits per element (metadata included)."""
        d = self.head_dim if head_dim is None else head_dim
        return sum(m.bits_per_element(d) for m in self.layers) / self.num_layers

    def fake_quant_seq(
        self, x: torch.Tensor, *, is_key: bool, layer_idx: int, k_mean=None, start: int = 0
    ) -> torch.Tensor:
        """``x [seq, H, d]`` of layer ``layer_idx`` -> what attention reads (model space).

        ``k_mean`` is ignored: the recipe uses its own key means (and key scales).
        """
        m = self.layers[layer_idx]
        s = self.layer_key_scale(layer_idx) if is_key else None
        if s is None:
            return m.fake_quant(x, is_key=is_key, k_mean=self.layer_key_mean(layer_idx))
        s = s.to(x.device)
        y = m.fake_quant(x.float() / s, is_key=True, k_mean=self.layer_key_mean(layer_idx))
        return (y.float() * s).to(x.dtype)

    def summary(self) -> str:
        """Runs of equal layer formats: ``"0-5 int4-bdr64-kv-kc; 6 int8-bdr64-kc; ..."``, then
        the smoothed layers' count if any (``"; key smoothing on 18/18 layers"``)."""
        runs: list[list] = []
        for i, m in enumerate(self.layers):
            if runs and runs[-1][2] == m.name:
                runs[-1][1] = i
            else:
                runs.append([i, i, m.name])
        out = "; ".join(f"{a}{'' if a == b else f'-{b}'} {n}" for a, b, n in runs)
        if self.k_scale is not None:
            on = sum(not bool((s == 1).all()) for s in self.k_scale)
            out += f"; key smoothing on {on}/{self.num_layers} layers"
        return out

    def counts(self) -> dict[str, int]:
        """How many layers use each format."""
        return dict(Counter(m.name for m in self.layers))

    # ---- storage --------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "method": self.name,
            "head_dim": self.head_dim,
            "num_kv_heads": self.num_kv_heads,
            "budget": self.budget,
            "bits_per_element": self.bits_per_element(),
            "layers": [m.name for m in self.layers],
            "num_sink": self.num_sink,
            "key_smoothing": self.k_scale is not None,
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        """Write the recipe (key means + JSON metadata) atomically to ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        means = self.k_means
        if means is None:  # safetensors needs a tensor; an empty one stands for "none"
            means = torch.zeros(0)
        tensors = {"k_means": means.float().contiguous()}
        if self.k_scale is not None:
            tensors["k_scale"] = self.k_scale.float().contiguous()
        tmp = path.with_suffix(".tmp")
        save_file(
            tensors,
            str(tmp),
            metadata={"recipe": json.dumps(self.to_json())},
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe written by :meth:`save` (ValueError naming the file if malformed)."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["recipe"])
                means = f.get_tensor("k_means")
                scale = f.get_tensor("k_scale") if "k_scale" in f.keys() else None
            head_dim = int(meta["head_dim"])
            layers = tuple(parse_method(n, head_dim) for n in meta["layers"])
            return cls(
                layers=layers,
                head_dim=head_dim,
                num_kv_heads=int(meta["num_kv_heads"]),
                k_means=means if means.numel() else None,
                budget=meta.get("budget"),
                info=meta.get("info") or {},
                # recipes stored before calibration chose sinks were measured without them
                num_sink=int(meta.get("num_sink", 0)),
                k_scale=scale,
            )
        except (KeyError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"malformed saw-int4 recipe file {path}: {e!r}") from None
