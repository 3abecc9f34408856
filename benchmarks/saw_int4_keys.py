"""Where a model's ``saw-int4`` loss sits: keys or values, few layers or many, and what finer key
groups would buy. Fake-quant perplexity (the calibration's numerics: ``fake_quant_heads``) on the
study's evaluation windows, with the stored recipe's key means, smoothing and sinks.

    PYTHONPATH=. python benchmarks/saw_int4_keys.py smollm2-135m --text austen \
        --json benchmarks/results/saw_int4_v4/keys_smollm2-135m.json

Variants (``--variants``, comma-separated; all default):

* ``recipe``: the recipe's per-layer formats;
* ``all4``: every layer in the recipe's INT4 format;
* ``k8``: keys INT8 in every layer, values as ``all4``; ``v8``: the reverse;
* ``k8top3``: ``all4`` with keys INT8 in the 3 layers of largest calibrated INT8 gain (1.5x
  the extra bits of one INT8 layer);
* ``khalf``: ``all4`` with keys quantized in two groups (one (scale, min) per half of the
  rotated key: +16 bits per key and head), ``recipe-khalf``: the recipe, the same on its INT4
  layers; ``kquarter``: four groups.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from sawkv.eval.calibrate import get_recipe
from sawkv.eval.calibrate_recipe import Cache, _FakeQuantLayer
from sawkv.eval.tasks import cached_windows, prefix_ids
from sawkv.hf.cache import cache_kwargs
from sawkv.models.hub import load_hf_model

VARIANTS = ("recipe", "all4", "k8", "v8", "k8top3", "khalf", "recipe-khalf", "kquarter")


def variant_layers(recipe, name: str) -> list[tuple]:
    """Per layer ``(method, k_bits, v_bits, k_group)`` of variant ``name``."""
    d = recipe.head_dim
    # the variants set the key groups themselves (a recipe's -kh layers: per half, as served)
    int4 = replace(next(m for m in recipe.layers if m.bits == 4), k_half_meta=False)
    gains = recipe.info.get("kl_drop_int8", {})
    top3 = {int(i) for i in sorted(gains, key=lambda i: -gains[i])[:3]}
    out = []
    for i, m in enumerate(recipe.layers):
        if name in ("recipe", "recipe-khalf"):
            half = m.k_half_meta or (name == "recipe-khalf" and m.bits == 4)
            out.append((replace(m, k_half_meta=False), m.bits, m.bits, d // 2 if half else None))
        else:
            k_bits = 8 if name == "k8" or (name == "k8top3" and i in top3) else 4
            group = {"khalf": d // 2, "kquarter": d // 4}.get(name)
            out.append((int4, k_bits, 8 if name == "v8" else 4, group))
    return out


def key_bits(layers, head_dim: int) -> float:
    """Bits per element of K and V together, metadata (fp16 scale + min per group) included."""
    total = 0.0
    for _, kb, vb, group in layers:
        total += kb + 32 / (group or head_dim) + vb + 32 / head_dim
    return total / (2 * len(layers))


@torch.no_grad()
def perplexity(model, windows, bos: bool, layers, recipe) -> float:
    nll, count = 0.0, 0
    for w in windows:
        cache = None
        if layers is not None:
            cache = Cache(layers=[
                _FakeQuantLayer(m, None if recipe.k_means is None else recipe.k_means[i].float(),
                                recipe.num_sink,
                                None if recipe.k_scale is None else recipe.k_scale[i],
                                k_bits=kb, v_bits=vb, k_group=g)
                for i, (m, kb, vb, g) in enumerate(layers)
            ])  # fmt: skip
        kwargs = {} if cache is None else cache_kwargs(model, cache)
        ids = w[None]
        logits = model(ids, **kwargs, use_cache=True).logits[0, int(bos) : -1]
        tgt = ids[0, 1 + int(bos) :]
        nll += float(F.cross_entropy(logits.float(), tgt, reduction="sum"))
        count += tgt.numel()
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--text", default="austen")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    model, tok = load_hf_model(args.model)
    recipe = get_recipe(model, tok, args.model)
    bos = bool(prefix_ids(tok))
    windows = cached_windows(tok, args.text, args.tokens, args.window, "eval", bos)
    t0 = time.perf_counter()
    base = perplexity(model, windows, bos, None, recipe)
    rows = [{"variant": "full", "ppl": base, "change_pct": 0.0, "bits": None}]
    print(f"{'full':14} {base:8.3f}", flush=True)
    for name in names:
        layers = variant_layers(recipe, name)
        ppl = perplexity(model, windows, bos, layers, recipe)
        bits = key_bits(layers, recipe.head_dim)
        rows.append({"variant": name, "ppl": ppl, "change_pct": 100 * (ppl / base - 1),
                     "bits": bits})  # fmt: skip
        print(f"{name:14} {ppl:8.3f} {rows[-1]['change_pct']:+6.2f}%  {bits:.3f} bits",
              flush=True)  # fmt: skip
    if args.json:
        out = {"model": args.model, "text": args.text, "tokens": args.tokens,
               "window": args.window, "recipe": recipe.summary(), "num_sink": recipe.num_sink,
               "seconds": time.perf_counter() - t0, "rows": rows}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
