"""A transformers 5.x ``Cache`` that really stores K/V encoded by a :class:`KVMethod`.

Each model layer gets a :class:`SawKVLayer`. On every ``update`` the new keys/values are encoded
(centered, rotated, quantized, INT4 packed two codes per byte) and appended to the layer's
stored bytes; the whole stored sequence is then decoded back to model space and handed to
attention. So attention sees exactly what the cache holds, prefill included (as in the paper),
and :meth:`SawKVCache.kv_bytes` counts the bytes really stored.

Layout: transformers passes K/V as ``[batch, num_kv_heads, seq, head_dim]``; the methods
expect heads second-to-last, so each layer stores ``Encoded.data [batch, seq, num_kv_heads,
...]`` and ``Encoded.meta [batch, seq, num_kv_heads, num_groups, 2]`` and grows them along
dim 1. Decoding the whole sequence at every step is O(seq) per step: fine for evaluation on CPU,
not meant for serving (that is the paged engine's job).

Only API present in transformers 5.17 and 5.23 is used (``DynamicLayer``, ``Cache(layers=...)``).
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch
from transformers.cache_utils import Cache, DynamicLayer

from sawkv.quant.methods import Encoded, KVMethod, parse_method
from sawkv.quant.recipe import DEFAULT_KV_METHOD, SAW_INT4_FALLBACK, Recipe, is_saw_int4

KC_MODES = ("static", "prefill")


def _cat(a: Encoded | None, b: Encoded) -> Encoded:
    """Append ``b`` to ``a`` along the sequence dim (1)."""
    if a is None:
        return b
    meta = None if a.meta is None else torch.cat([a.meta, b.meta], dim=1)
    return Encoded(torch.cat([a.data, b.data], dim=1), meta)


def _cat_t(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=1)


def _map(enc: Encoded | None, fn) -> Encoded | None:
    """Apply ``fn`` to data and meta (batch reordering, cropping)."""
    if enc is None:
        return None
    return Encoded(fn(enc.data), None if enc.meta is None else fn(enc.meta))


class SawKVLayer(DynamicLayer):
    """One layer's quantized K/V store.

    Args:
        method: resolved :class:`KVMethod`.
        k_mean: ``[num_kv_heads, head_dim]`` static key mean (``-kc``), or None (no centering).
        kc_mode: ``"static"`` uses ``k_mean``; ``"prefill"`` takes each sequence's own mean of the
            keys of its first ``update`` (the prefill) -- an eval-only variant: it is not exact
            once pages are shared between sequences (prefix caching), the static mean is.
        num_sink: first tokens kept exact, in the model dtype.
        k_scale: ``[num_kv_heads, head_dim]`` key smoothing of a recipe layer (keys stored as
            ``k / k_scale``, ``k_mean`` being their mean), or None.
    """

    def __init__(
        self,
        method: KVMethod,
        k_mean: torch.Tensor | None = None,
        kc_mode: str = "static",
        num_sink: int = 0,
        k_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        if kc_mode not in KC_MODES:
            raise ValueError(f"kc_mode must be one of {KC_MODES}, got {kc_mode!r}")
        if num_sink < 0:
            raise ValueError(f"num_sink must be >= 0, got {num_sink}")
        self.method = method
        self.k_mean = k_mean
        self.kc_mode = kc_mode
        self.num_sink = num_sink
        # [H, D] key smoothing of a recipe: K is stored as k / s (k_mean is its mean) and read
        # back times s, so the layer returns model-space keys
        self.k_scale = None if k_scale is None else k_scale.float()
        self.cumulative_length = 0
        self._k: Encoded | None = None
        self._v: Encoded | None = None
        # The first num_sink tokens ("attention sinks") kept in the model dtype, [B, n, H, D].
        self._sink_k: torch.Tensor | None = None
        self._sink_v: torch.Tensor | None = None

    # ---- write / read -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _mean_for(self, key_states: torch.Tensor) -> torch.Tensor | None:
        """Key mean broadcastable against ``[batch, seq, heads, head_dim]``, or None."""
        if not self.method.center_k:
            return None
        if self.kc_mode == "prefill":
            if self.cumulative_length == 0:  # prefill: [B, H, S, D] -> [B, 1, H, D]
                self.k_mean = key_states.float().mean(dim=2).unsqueeze(1)
            return self.k_mean
        if self.k_mean is not None and self.k_mean.device != key_states.device:
            self.k_mean = self.k_mean.to(key_states.device)  # once: _decode reads it too
        return self.k_mean

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Encode and store the new ``[B, H, S, D]`` K/V; return all stored K/V decoded.

        Returns:
            keys, values ``[B, H, seq_len_so_far, D]`` in the input dtype, model space.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        mu = self._mean_for(key_states)
        ks, vs = key_states.transpose(1, 2), value_states.transpose(1, 2)  # [B, S, H, D]
        n = max(0, min(self.num_sink - self.cumulative_length, ks.shape[1]))
        if n:
            self._sink_k = _cat_t(self._sink_k, ks[:, :n])
            self._sink_v = _cat_t(self._sink_v, vs[:, :n])
            ks, vs = ks[:, n:], vs[:, n:]
        if ks.shape[1]:
            if self.k_scale is not None:
                self.k_scale = self.k_scale.to(ks.device)
                ks = ks.float() / self.k_scale
            k_new = self.method.encode(ks, is_key=True, k_mean=mu)
            self._k = _cat(self._k, k_new)
            self._v = _cat(self._v, self.method.encode(vs, is_key=False))
        self.cumulative_length += key_states.shape[-2]
        return self._decode(key_states.dtype)

    def _decode(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        m, k, v = self.method, self._sink_k, self._sink_v
        if self._k is not None:
            kq = m.decode(self._k, is_key=True, k_mean=self.k_mean, dtype=dtype, rotated=False)
            if self.k_scale is not None:
                kq = (kq.float() * self.k_scale).to(dtype)
            vq = m.decode(self._v, is_key=False, dtype=dtype, rotated=False)
            k, v = _cat_t(k, kq), _cat_t(v, vq)
        return k.to(dtype).transpose(1, 2), v.to(dtype).transpose(1, 2)

    # ---- bookkeeping --------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        """Bytes stored for K and V (codes + metadata, sink tokens in the model dtype)."""
        n = sum(e.nbytes for e in (self._k, self._v) if e is not None)
        return n + sum(t.numel() * t.element_size() for t in self._sinks())

    def _sinks(self) -> list[torch.Tensor]:
        return [t for t in (self._sink_k, self._sink_v) if t is not None]

    def reset(self) -> None:
        super().reset()
        self._k = self._v = self._sink_k = self._sink_v = None
        self.cumulative_length = 0
        if self.kc_mode == "prefill":
            self.k_mean = None

    def offload(self):  # stored bytes stay where they are; nothing to move
        pass

    def prefetch(self):
        pass

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many tokens from the end; positive (5.17 legacy): keep that many."""
        n = tokens_to_remove
        keep = n if n > 0 else self.cumulative_length + n
        if tokens_to_remove == 0 or keep >= self.cumulative_length:
            return
        keep = max(keep, 0)
        num_sink = 0 if self._sink_k is None else self._sink_k.shape[1]
        if self._sink_k is not None:
            self._sink_k, self._sink_v = self._sink_k[:, :keep], self._sink_v[:, :keep]
        rest = max(keep - num_sink, 0)
        self._k = _map(self._k, lambda t: t[:, :rest])
        self._v = _map(self._v, lambda t: t[:, :rest])
        self.cumulative_length = keep

    def _batch_map(self, fn) -> None:
        self._k, self._v = _map(self._k, fn), _map(self._v, fn)
        if self._sink_k is not None:
            self._sink_k, self._sink_v = fn(self._sink_k), fn(self._sink_v)
        if self.kc_mode == "prefill" and self.k_mean is not None:
            self.k_mean = fn(self.k_mean)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.cumulative_length:
            self._batch_map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.cumulative_length:
            self._batch_map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.cumulative_length:
            self._batch_map(lambda t: t[indices, ...])


def attention_shape(config) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers (text) config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    num_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    return text.num_hidden_layers, num_kv_heads, head_dim


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` to pass a cache to ``model(...)`` or ``model.generate(...)``.

    transformers 5.23 renamed the argument ``past_key_values`` to ``cache`` (the old name still
    works there but warns); 5.17 knows only ``past_key_values`` and would silently drop
    ``cache``. The model's own ``forward`` signature says which name it takes.
    """
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def model_name_of(model_config_or_model) -> str | None:
    """The name or directory a transformers model was loaded from (``config._name_or_path``)."""
    config = getattr(model_config_or_model, "config", model_config_or_model)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return str(name) if name else None


def resolve_for_model(
    method, model_config_or_model, model_name: str | None = None, tokenizer=None, k_means=None
):
    """A method name / object -> what a cache of this model stores.

    ``saw-int4`` becomes the model's :class:`Recipe`: the stored one, else calibrated now when
    the model has weights (``sawkv.eval.calibrate.get_recipe``), else
    :data:`~sawkv.quant.recipe.SAW_INT4_FALLBACK` with a warning. Other names are parsed and
    resolved against the model's head_dim.

    Args:
        method: name, :class:`KVMethod`, :class:`Recipe` or a per-layer list of methods.
        model_config_or_model: a transformers model or its config.
        model_name: name or directory for the model's cache; default ``config._name_or_path``.
        tokenizer: for a first-use calibration (default: loaded from the model's directory).
        k_means: ``[num_layers, num_kv_heads, head_dim]`` key means of a per-layer list with
            ``-kc`` layers (default: the model's stored means, else zeros with a warning).
    """
    config = getattr(model_config_or_model, "config", model_config_or_model)
    num_layers, num_kv_heads, head_dim = attention_shape(config)
    if isinstance(method, (list, tuple)):  # explicit per-layer formats (calibration probes)
        layers = tuple(parse_method(m) if isinstance(m, str) else m for m in method)
        if len(layers) != num_layers:
            raise ValueError(f"got {len(layers)} layer methods for a {num_layers}-layer model")
        if not any(m.center_k for m in layers):
            k_means = None
        elif k_means is None:
            k_means = _stored_key_means(model_config_or_model, model_name)
            if k_means is None:
                warnings.warn("per-layer -kc formats without key means: mu = 0", stacklevel=3)
                k_means = torch.zeros(num_layers, num_kv_heads, head_dim)
        means = None if k_means is None else k_means.float()
        return Recipe(layers, head_dim, num_kv_heads, k_means=means, budget=None)
    if not is_saw_int4(method):
        method = parse_method(method) if isinstance(method, str) else method
        return method.resolve(head_dim)
    name = model_name or model_name_of(config)
    recipe = _load_recipe(name) if name else None
    if recipe is None and name and isinstance(model_config_or_model, torch.nn.Module):
        from sawkv.eval.calibrate import get_recipe

        tokenizer = tokenizer or _tokenizer_for(name)
        if tokenizer is not None:
            recipe = get_recipe(model_config_or_model, tokenizer, name)
    if recipe is None:
        warnings.warn(
            f"saw-int4: no recipe for model {name!r} and no way to calibrate one (run "
            f"`sawkv calibrate --model NAME_OR_DIR`); using {SAW_INT4_FALLBACK}",
            stacklevel=3,
        )
        return parse_method(SAW_INT4_FALLBACK, head_dim)
    if (recipe.num_layers, recipe.num_kv_heads, recipe.head_dim) != (
        num_layers,
        num_kv_heads,
        head_dim,
    ):
        raise ValueError(
            f"the saw-int4 recipe of {name!r} is for {recipe.num_layers} layers x "
            f"{recipe.num_kv_heads} KV heads x head_dim {recipe.head_dim}, not this model's "
            f"{num_layers} x {num_kv_heads} x {head_dim}: recalibrate with `sawkv calibrate`"
        )
    return recipe


def _load_recipe(name: str) -> Recipe | None:
    from sawkv.models.calibration import load_recipe

    return load_recipe(name)


def _tokenizer_for(name: str):
    """The tokenizer of a known model name or a local directory, or None."""
    from transformers import AutoTokenizer

    try:
        from sawkv.models.hub import resolve_model_dir

        return AutoTokenizer.from_pretrained(str(resolve_model_dir(name)))
    except (OSError, ValueError):
        return None


def _stored_key_means(model_config_or_model, model_name: str | None):
    name = model_name or model_name_of(model_config_or_model)
    if not name:
        return None
    from sawkv.models.calibration import load_key_means

    return load_key_means(name)


class SawKVCache(Cache):
    """Drop-in transformers cache storing K/V with a sawkv method.

    Args:
        model_config_or_model: a transformers model or its config.
        method: method name (default ``saw-int4``, the model's calibrated recipe), a
            :class:`KVMethod`, a :class:`Recipe`, or a list of one method per layer.
        k_means: ``[num_layers, num_kv_heads, head_dim]`` static key means for ``-kc``; None
            loads the model's calibrated means when it is known (``config._name_or_path``),
            else zeros with a warning. A recipe always uses its own means.
        kc_mode: ``"static"`` (exact under prefix sharing; what the engine uses) or ``"prefill"``
            (each sequence's own prefill key mean; eval-only comparison).
        num_sink: keep each sequence's first ``num_sink`` tokens ("attention sinks", which draw a
            large share of attention) in the model dtype; the rest as ``method``. None: a
            recipe's own (``saw-int4``), else 0.
        model_name: name or directory whose calibration to use (default: the config's
            ``_name_or_path``).

    Example::

        cache = SawKVCache(model)  # saw-int4: the calibrated recipe (built on first use)
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=20)
        cache.kv_bytes()
    """

    def __init__(
        self,
        model_config_or_model,
        method: str | KVMethod | Recipe | list = DEFAULT_KV_METHOD,
        k_means: torch.Tensor | None = None,
        kc_mode: str = "static",
        num_sink: int | None = None,
        model_name: str | os.PathLike | None = None,
    ):
        if kc_mode not in KC_MODES:
            raise ValueError(f"kc_mode must be one of {KC_MODES}, got {kc_mode!r}")
        config = getattr(model_config_or_model, "config", model_config_or_model)
        num_layers, num_kv_heads, head_dim = attention_shape(config)
        name = None if model_name is None else str(model_name)
        method = resolve_for_model(method, model_config_or_model, name, k_means=k_means)
        self.method = method
        self.head_dim = head_dim
        if isinstance(method, Recipe):
            if kc_mode == "prefill" and method.center_k:
                raise ValueError("a per-layer recipe centers keys on its static means only")
            sinks = method.num_sink if num_sink is None else num_sink
            layers = [
                SawKVLayer(m, method.layer_key_mean(i), "static", sinks, method.layer_key_scale(i))
                for i, m in enumerate(method.layers)
            ]
        else:
            if k_means is None and method.center_k and kc_mode == "static":
                k_means = _stored_key_means(model_config_or_model, name)
            shape = (num_layers, num_kv_heads, head_dim)
            k_means = self._check_means(k_means, method, kc_mode, shape)
            layers = [
                SawKVLayer(method, None if k_means is None else k_means[i], kc_mode, num_sink or 0)
                for i in range(num_layers)
            ]
        super().__init__(layers=layers)

    @staticmethod
    def _check_means(k_means, method: KVMethod, kc_mode: str, shape: tuple[int, int, int]):
        if not method.center_k or kc_mode == "prefill":
            return None
        if k_means is None:
            warnings.warn(
                f"{method.name}: no calibrated key means for this model; using mu = 0 "
                "(run sawkv.eval.calibrate.calibrate_key_means first)",
                stacklevel=3,
            )
            return None
        if tuple(k_means.shape) != shape:
            raise ValueError(
                f"k_means has shape {tuple(k_means.shape)}, expected "
                f"[num_layers, num_kv_heads, head_dim] = {list(shape)}"
            )
        return k_means.float()

    def kv_bytes(self) -> int:
        """Bytes of K and V really stored, all layers (codes + metadata)."""
        return sum(layer.nbytes() for layer in self.layers)

    def bits_per_element(self) -> float:
        """Stored bits per K/V element, metadata included (measured, not from the layout)."""
        elems = 0
        for layer in self.layers:
            for t in [layer._k.data if layer._k is not None else None, layer._sink_k]:
                if t is not None:
                    b, s, h = t.shape[:3]
                    elems += 2 * b * s * h * self.head_dim
        return 8.0 * self.kv_bytes() / elems if elems else float("nan")
