"""What-if KL of saw-int4 variants the kernels do not serve (K-only INT8, sink tokens), on
held-out calibration windows.

Windows: the calibration split (never evaluation tokens) from token ``skip`` on, i.e. after
the tokens the recipe was calibrated on, at the evaluation's window length (1,024). Every
variant is a fake-quant cache (same numerics as the served formats); KL is the mean per-token
KL of next-token distributions to full precision.

    PYTHONPATH=. python benchmarks/saw_int4_whatif.py MODEL [--v2 recipe_v2.json] [--out J]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers.cache_utils import Cache, DynamicLayer

from sawkv.eval.calibrate_recipe import fake_quant_heads
from sawkv.eval.recipe_search import KLScorer
from sawkv.hf.cache import cache_kwargs
from sawkv.quant.methods import parse_method


class _VariantLayer(DynamicLayer):
    """K and V each with its own token-wise format (None: exact); the first ``num_sink``
    tokens of the sequence are kept exact."""

    def __init__(self, k_method, v_method, k_mean, num_sink: int = 0):
        super().__init__()
        self.km, self.vm, self.mu, self.num_sink = k_method, v_method, k_mean, num_sink

    def _quant(self, x, bits: int, had_block: int | None, mean):
        out = torch.stack([fake_quant_heads(h.float(), bits, had_block, mean) for h in x])
        out = out.to(x.dtype)
        out[:, :, : self.num_sink] = x[:, :, : self.num_sink]  # one prefill covers the sinks
        return out

    def update(self, key_states, value_states, *args, **kwargs):
        km, vm = self.km, self.vm
        if km is not None:
            mu = self.mu if km.center_k else None
            key_states = self._quant(key_states, km.bits, km.had_block, mu)
        if vm is not None:
            hb = vm.had_block if vm.rotate_v else None
            value_states = self._quant(value_states, vm.bits, hb, None)
        return super().update(key_states, value_states, *args, **kwargs)


def variant_cache(k_layers, v_layers, k_means, num_sink: int = 0) -> Cache:
    return Cache(layers=[_VariantLayer(k, v, k_means[i].float(), num_sink)
                         for i, (k, v) in enumerate(zip(k_layers, v_layers))])  # fmt: skip


class VariantScorer(KLScorer):
    """:class:`KLScorer` over ``(k_layers, v_layers, num_sink)`` variants."""

    @torch.no_grad()
    def variant(self, k_layers, v_layers, num_sink: int = 0, k_means=None) -> float:
        import torch.nn.functional as F

        k_means = self.k_means if k_means is None else k_means
        cache = variant_cache(k_layers, v_layers, k_means, num_sink)
        logits = self.model(self.ids, **cache_kwargs(self.model, cache), use_cache=True).logits
        total = 0.0
        for ref, out in zip(self.ref, logits):
            total += float((ref.exp() * (ref - F.log_softmax(out.float(), -1))).sum())
        return total / self.ref.shape[0] / self.ref.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--v2", type=Path, help="a v2 recipe JSON (layer names) to compare")
    ap.add_argument("--window-len", type=int, default=1024)
    ap.add_argument("--skip", type=int, default=1024, help="calibration tokens skipped")
    ap.add_argument("--texts", default="austen,paulgraham,wikipedia,owt")
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from sawkv.eval.tasks import cached_windows, prefix_ids
    from sawkv.models.calibration import load_recipe
    from sawkv.models.hub import load_hf_model

    model, tok = load_hf_model(args.model)
    recipe = load_recipe(args.model)
    bos = bool(prefix_ids(tok))
    # one calibration window of skip + window_len tokens per text, its first skip dropped
    n, s = args.skip + args.window_len, args.skip
    wins = [cached_windows(tok, t, n, n, "calib", bos)[0] for t in args.texts.split(",")]
    ids = torch.stack([torch.cat([w[:1], w[1 + s :]]) if bos else w[s:] for w in wins])
    d, L = recipe.head_dim, recipe.num_layers
    score = VariantScorer(model, ids, recipe.k_means)
    rec = list(recipe.layers)
    int4 = [m if m.bits == 4 else replace(m, bits=4) for m in rec]
    int8 = [replace(m, bits=8) for m in rec]
    hi = recipe.info.get("int8_layers", [])
    drops = {int(k): v for k, v in recipe.info.get("kl_drop_int8", {}).items()}
    nxt = [i for i in sorted(drops, key=lambda i: -drops[i]) if i not in hi][:1]
    k2 = [int8[i] if i in hi + nxt else int4[i] for i in range(L)]
    variants = {
        "uniform int4-bdr64-kv-kc": ([parse_method("int4-bdr64-kv-kc", d)] * L,) * 2 + (0,),
        "v3 recipe": (rec, rec, 0),
        "v3 all-INT4 (no INT8 layer)": (int4, int4, 0),
        "v3 + 1 exact sink token": (rec, rec, 1),
        "v3 + 4 exact sink tokens": (rec, rec, 4),
        f"v3 K-only INT8 on layers {sorted(hi + nxt)} (same bits as 1 K+V INT8)": (k2, int4, 0),
        "diag: all K INT8, V as recipe": (int8, rec, 0),
        "diag: all V INT8, K as recipe": (rec, int8, 0),
    }
    if args.v2:
        v2 = [parse_method(n, d) for n in json.loads(args.v2.read_text())["layers"]]
        variants["v2 recipe"] = (v2, v2, 0)
    # key means over the first window_len calibration tokens of each text (before the skipped
    # part, so disjoint from the scored tokens) instead of the recipe's 512-token windows
    long_means = None
    if args.skip >= args.window_len:
        from sawkv.eval.calibrate import keys_mean

        long_means = keys_mean(model, torch.stack([w[: args.window_len + bos] for w in wins]))
        uni = [parse_method("int4-bdr64-kv-kc", d)] * L
        variants[f"uniform int4-bdr64-kv-kc, key means of {args.window_len}-token windows"] = (
            uni, uni, 0, long_means)  # fmt: skip
        variants[f"v3 recipe, key means of {args.window_len}-token windows"] = (
            rec, rec, 0, long_means)  # fmt: skip
    keep = [k for k in args.only.split(",") if k]
    variants = {n: v for n, v in variants.items() if not keep or any(k in n for k in keep)}
    results = {}
    for name, (kl, vl, sink, *means) in variants.items():
        t0 = time.perf_counter()
        results[name] = score.variant(kl, vl, sink, *means)
        print(f"{results[name]:.5f}  {name}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        info = {"model": args.model, "window_len": args.window_len, "skip": args.skip}
        info.update(texts=args.texts.split(","), recipe=recipe.summary(), kl=results)
        args.out.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
