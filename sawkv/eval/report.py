"""The study report: a markdown table per model, one JSON summary, plots.

Reads the per-(model, method, task) JSONs of :mod:`sawkv.eval.study` and writes, under
``out_dir`` (``benchmarks/results``):

* ``report.md``: per model, a method x task table: bits per element (metadata included), the
  concurrent 16K-token sequences an H200 would hold at those bits (computed), each
  task's primary metric with its standard error, and for every method vs the reference
  (``auto``, the model's own KV dtype) the paired difference on the same items / windows with
  its paired SE, plus the perplexity ratio and the share of the naive-INT4 gap recovered;
* ``study_summary.json``: the same numbers, machine-readable;
* ``study_<model>_bits.png``: primary metric vs bits per element, one panel per task;
* ``study_<model>_sensitivity.png``: the per-layer x KV-head sensitivity heatmap (when a
  sensitivity profile was computed for mixed precision);
* ``study_notes.md`` (hand-written conclusions), when present, opens the report.

Paired SEs: for accuracy the per-item difference of 0/1 correctness; for perplexity the
per-window difference of mean NLL (delta method on the ratio). A difference smaller than about
two paired SEs is noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sawkv.eval.study import result_path, safe_name

REFERENCE = "auto"
NAIVE = "int4"
# KV pool of an H200 as `sawkv serve` sizes it: gpu_memory_utilization 0.9 of 141 GB (the
# weights, small for the study's models, are not subtracted)
H200_KV_BYTES = 0.9 * 141e9
CAPACITY_TOKENS = 16384


def attention_shape_of(model: str) -> tuple[int, int, int] | None:
    """``(num_layers, num_kv_heads, head_dim)`` from the model's config; None if unavailable."""
    try:
        from transformers import AutoConfig

        from sawkv.hf.cache import attention_shape
        from sawkv.models import resolve_model_dir

        return tuple(attention_shape(AutoConfig.from_pretrained(resolve_model_dir(model))))
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def concurrent_seqs(shape: tuple[int, int, int] | None, bits: float) -> int | None:
    """Sequences of :data:`CAPACITY_TOKENS` tokens whose K and V fit :data:`H200_KV_BYTES` at
    ``bits`` per element (sinks not counted); None without the model's shape."""
    if shape is None:
        return None
    num_layers, num_kv_heads, head_dim = shape
    bytes_per_token = bits * 2 * num_layers * num_kv_heads * head_dim / 8
    return int(H200_KV_BYTES // (CAPACITY_TOKENS * bytes_per_token))


def load_results(out_dir, models, methods, tasks) -> dict:
    """``{model: {method: {task: result}}}`` for the JSONs present (methods canonical)."""
    out: dict = {}
    for model in models:
        for method in methods:
            for task in tasks:
                p = result_path(Path(out_dir), model, method, task)
                if p.is_file():
                    out.setdefault(model, {}).setdefault(method, {})[task] = json.loads(
                        p.read_text()
                    )
    return out


def _values(res: dict) -> list[float]:
    """Per-item (or per-window) values a paired comparison is taken over."""
    if res["primary"] == "ppl":
        return res["window_nll"]
    return res["correct_norm"] if res["primary"] == "acc_norm" else res["correct"]


def paired(res: dict, ref: dict) -> tuple[float, float] | None:
    """(mean difference, paired SE) of ``res - ref`` over the same items; None if unpaired."""
    a, b = _values(res), _values(ref)
    if len(a) != len(b) or not a:
        return None
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mu = sum(d) / n
    if n < 2:
        return mu, float("nan")
    sd = math.sqrt(sum((x - mu) ** 2 for x in d) / (n - 1))
    return mu, sd / math.sqrt(n)


def _other_size(res: dict, ref: dict) -> bool:
    """Whether two results of a task were scored on different amounts of data (a --size or
    --mc-items change between runs into one --out): their difference would mean nothing."""
    for key in ("num_tokens", "num_items", "size"):
        if key in res and key in ref and res[key] != ref[key]:
            return True
    return False


def compare(res: dict, ref: dict | None, naive: dict | None) -> dict:
    """Differences of one result vs the reference (and naive INT4, for the gap recovered);
    ``{"other_size": True}`` alone when the two were scored on different data."""
    out: dict = {}
    if ref is None:
        return out
    if _other_size(res, ref):
        return {"other_size": True}
    if naive is not None and _other_size(naive, ref):
        naive = None
    p = paired(res, ref)
    if res["primary"] == "ppl":
        out["ppl_ratio"] = res["ppl"] / ref["ppl"]
        if p is not None:  # ratio = exp(mean NLL difference)
            out["ppl_ratio_se"] = out["ppl_ratio"] * p[1]
        if naive is not None and naive["ppl"] - ref["ppl"] > 0:
            out["gap_recovered"] = (naive["ppl"] - res["ppl"]) / (naive["ppl"] - ref["ppl"])
    elif p is not None:
        out["delta"], out["delta_se"] = p
    return out


def _cell(res: dict | None, cmp: dict) -> str:
    if res is None:
        return "–"
    key = res["primary"]
    if cmp.get("other_size"):
        # no difference against a reference scored on other data
        n = f"{res['num_tokens']} tok" if "num_tokens" in res else f"n={res.get('num_items')}"
        value = res["ppl"] if key == "ppl" else 100 * res[key]
        return f"{value:.2f} (other size: {n})"
    if key == "ppl":
        s = f"{res['ppl']:.2f}±{res['ppl_se']:.2f}"
        if "ppl_ratio" in cmp:
            s += f" ({100 * (cmp['ppl_ratio'] - 1):+.1f}%"
            s += f"±{100 * cmp['ppl_ratio_se']:.1f})" if "ppl_ratio_se" in cmp else ")"
        return s
    s = f"{100 * res[key]:.1f}±{100 * res[key + '_se']:.1f}"
    if "delta" in cmp:
        s += f" ({100 * cmp['delta']:+.1f}±{100 * cmp['delta_se']:.1f})"
    return s


def _header_name(task: str, results: dict) -> str:
    for per_task in results.values():
        if task in per_task:
            r = per_task[task]
            extra = f", n={r['num_items']}" if "num_items" in r else f", {r['num_tokens']} tok"
            return f"{task} ({r['primary']}{extra})"
    return task


def model_table(model: str, results: dict, methods: list[str], tasks: list[str]) -> tuple:
    """Markdown table and summary rows for one model."""
    ref, naive = results.get(REFERENCE, {}), results.get(NAIVE, {})
    tasks = [t for t in tasks if any(t in results.get(m, {}) for m in methods)]
    gap_task = next((t for t in tasks if t.startswith("ppl-")), None)
    shape = attention_shape_of(model)
    head = ["method", "bits/elem", "16K seqs / H200"] + [_header_name(t, results) for t in tasks]
    if gap_task:
        head.append(f"gap recovered ({gap_task})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for m in methods:
        per = results.get(m)
        if not per:
            continue
        bits = next(iter(per.values()))["bits_per_element"]
        # `auto` is scored in fp32 on the CPU; a server would hold it in BF16
        seqs = concurrent_seqs(shape, min(bits, 16.0))
        cells = [m, f"{bits:.2f}", "–" if seqs is None else f"{seqs:,}"]
        row = {"method": m, "bits_per_element": bits, "h200_16k_seqs": seqs, "tasks": {}}
        for t in tasks:
            res = per.get(t)
            cmp = compare(res, ref.get(t), naive.get(t)) if res and m != REFERENCE else {}
            cells.append(_cell(res, cmp) + (" †" if _other_device(res, ref.get(t)) else ""))
            if res:
                row["tasks"][t] = {k: res.get(k) for k in ("primary", res["primary"],
                                   res["primary"] + "_se")} | cmp  # fmt: skip
        if gap_task:
            g = row["tasks"].get(gap_task, {}).get("gap_recovered")
            cells.append("–" if g is None else f"{100 * g:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
        rows.append(row)
    if any(" †" in line for line in lines[2:]):
        lines += [
            "",
            f"† scored on another device than `{REFERENCE}` (CPU vs GPU, both fp32): "
            "the paired difference then includes float-rounding differences of the two.",
        ]
    return "\n".join(lines), rows


def _other_device(res: dict | None, ref: dict | None) -> bool:
    """Whether ``res`` and ``ref`` both name a device and the two differ."""
    if not res or not ref or "device" not in res or "device" not in ref:
        return False
    return res["device"] != ref["device"]


def plot_bits(model: str, rows: list[dict], path: Path) -> None:
    """Each task's metric vs bits per element (perplexity as the ratio to ``auto``), one panel
    per task, one marker per method (legend below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for r in rows for t in r["tasks"]})
    if not tasks:
        return
    ncol = min(3, len(tasks))
    nrow = math.ceil(len(tasks) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow + 1.2), squeeze=False)
    markers = "osD^v<>phX*P8"
    handles = {}
    for ax, t in zip(axes.flat, tasks):
        for i, r in enumerate(rows):
            v = r["tasks"].get(t)
            if not v:
                continue
            is_ppl = v["primary"] == "ppl"
            y = (
                v.get("ppl_ratio", 1.0 if r["method"] == REFERENCE else None)
                if is_ppl
                else (v[v["primary"]])
            )
            if y is None:
                continue
            err = v.get("ppl_ratio_se", 0.0) if is_ppl else v.get(v["primary"] + "_se", 0.0)
            h = ax.errorbar(r["bits_per_element"], y, yerr=err or 0, fmt=markers[i % len(markers)],
                            color=f"C{i % 10}", capsize=2, label=r["method"])  # fmt: skip
            handles[r["method"]] = h
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("bits per element (incl. metadata)")
        # log2 axis: the 2-5-bit methods would otherwise crowd next to auto's 16/32 bits
        ax.set_xscale("log", base=2)
        ax.set_xticks([2, 3, 4, 5, 8, 16, 32], labels=["2", "3", "4", "5", "8", "16", "32"])
        if t.startswith("ppl-"):
            ax.set_yscale("log")
            ax.set_ylabel("perplexity / auto")
        else:
            ax.set_ylabel(t.split()[0])
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=5, fontsize=7)
    fig.suptitle(f"{model}: accuracy vs KV bits")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sensitivity(model: str, path: Path) -> bool:
    """Heatmap of the cached sensitivity profile of ``model``; False when none exists."""
    import torch

    from sawkv.models.hub import model_cache_dir

    files = sorted(Path(model_cache_dir(model)).glob("sensitivity_*.pt"))
    if not files:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sens = torch.load(files[0]).float()
    fig, ax = plt.subplots(figsize=(2 + 0.6 * sens.shape[1], 1 + 0.18 * sens.shape[0]))
    im = ax.imshow(sens.clamp(min=1e-6).log10().numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(sens.shape[1]))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"{model}\nlog10 KL, {files[0].stem}", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


CAVEAT = (
    "Baseline caveat: the reference is the model's own 4/5-bit GGUF weights with full-precision "
    "KV (`auto`); KV quantization is measured against that. All K/V are read quantized, prefill "
    "included. Cells: metric ± SE, then (difference vs `auto` ± paired SE over the same items / "
    "windows). Bits per element include (scale, min) metadata. `16K seqs / H200` is computed, "
    "not measured: 0.9 x 141 GB over 16,384 tokens x the K/V bytes per token at those bits "
    "(`auto` as BF16; weights and sink tokens not counted). KIVI's full-precision residual "
    "window and mixed precision's sink tokens are not counted (KIVI's window of 128 recent "
    "tokens covers a whole multiple-choice prompt, so its MC cells equal `auto` by construction). "
    "Baseline methods (kivi, kmeans, "
    "gptq, mixed) are simulated (fake-quant) and not servable by the paged engine."
)


def _canon(method: str, model: str) -> str | None:
    """Canonical name of ``method`` for ``model``; None where it does not apply (e.g. a
    Hadamard block larger than the model's head_dim)."""
    from sawkv.eval.study import canonical_method_name

    try:
        return canonical_method_name(method, model)
    except ValueError:
        return None


def build_report(out_dir, models, methods, tasks) -> Path:
    """Write ``report.md``, ``study_summary.json`` and the plots; returns the report path.

    Hand-written conclusions live in ``<out_dir>/study_notes.md`` and open the report verbatim."""
    out_dir = Path(out_dir)
    md = ["# KV-cache accuracy study", "", CAVEAT, ""]
    notes = out_dir / "study_notes.md"
    if notes.is_file():  # hand-written headline and conclusions go first
        md += [notes.read_text(), ""]
    summary = {}
    for model in models:
        canon = list(dict.fromkeys(filter(None, (_canon(m, model) for m in methods))))
        results = load_results(out_dir, [model], canon, tasks).get(model, {})
        if not results:
            md += [f"## {model}", "", "(no results yet)", ""]
            continue
        table, rows = model_table(model, results, canon, list(tasks))
        summary[model] = rows
        stem = f"study_{safe_name(Path(model).name)}"
        plot_bits(model, rows, out_dir / f"{stem}_bits.png")
        md += [f"## {model}", "", table, "", f"![accuracy vs bits]({stem}_bits.png)", ""]
        if plot_sensitivity(model, out_dir / f"{stem}_sensitivity.png"):
            md += [f"![sensitivity]({stem}_sensitivity.png)", ""]
    (out_dir / "study_summary.json").write_text(json.dumps(summary, indent=1))
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path
