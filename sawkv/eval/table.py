"""The method comparison table (rich) and plot (matplotlib) for perplexity results.

A *result* is the dict :func:`sawkv.eval.perplexity.perplexity` returns plus a ``label``
(the method name, ``@prefill`` appended for the prefill-mean centering variant). Ratios are
against the reference (``auto`` = unquantized KV in the model's dtype, else ``bf16``); the
share of the naive-INT4 gap recovered is ``(ppl_int4 - ppl) / (ppl_int4 - ppl_ref)``, which
flatters every method when naive INT4 collapses, so the ratio is the number to judge by.
"""

from __future__ import annotations

import math

REFERENCE_ORDER = ("auto", "bf16", "fp16")
NAIVE = "int4"


def label_of(result: dict) -> str:
    return result.get("label") or result["method"]


def reference(results: list[dict]) -> dict | None:
    """The unquantized-KV result to compare against (auto, else bf16, else fp16)."""
    by_label = {label_of(r): r for r in results}
    for name in REFERENCE_ORDER:
        if name in by_label:
            return by_label[name]
    return None


def paired_delta(result: dict, ref: dict) -> tuple[float, float]:
    """Perplexity change vs ``ref`` in percent and its paired standard error (same windows)."""
    ratio = result["ppl"] / ref["ppl"]
    a, b = result.get("window_nll") or [], ref.get("window_nll") or []
    se = float("nan")
    if len(a) == len(b) and len(a) > 1:
        d = [x - y for x, y in zip(a, b)]
        mu = sum(d) / len(d)
        se = math.sqrt(sum((x - mu) ** 2 for x in d) / (len(d) - 1) / len(d))
    return 100.0 * (ratio - 1.0), 100.0 * ratio * se


def add_comparisons(results: list[dict]) -> list[dict]:
    """Add ``ratio``, ``delta_pct``, ``delta_se_pct`` and ``gap_recovered`` to each result."""
    ref = reference(results)
    naive = next((r for r in results if label_of(r) == NAIVE), None)
    for r in results:
        if ref is None:
            continue
        r["ratio"] = r["ppl"] / ref["ppl"]
        r["delta_pct"], r["delta_se_pct"] = paired_delta(r, ref)
        gap = None if naive is None else naive["ppl"] - ref["ppl"]
        r["gap_recovered"] = (naive["ppl"] - r["ppl"]) / gap if gap and gap > 0 else None
    return results


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _fmt_ppl(r: dict) -> str:
    ppl, se = r["ppl"], r.get("ppl_se", float("nan"))
    digits = 2 if ppl < 1000 else 0
    return f"{ppl:,.{digits}f} ± {se:,.{digits}f}" if not math.isnan(se) else f"{ppl:,.{digits}f}"


def build_table(results: list[dict], title: str = ""):
    """A ``rich.table.Table`` of the results (comparisons added in place)."""
    from rich.table import Table

    add_comparisons(results)
    t = Table(title=title)
    for col in (
        "method",
        "bits/elem",
        "KV bytes / window",
        "perplexity ± se",
        "Δ vs ref",
        "naive-INT4 gap recovered",
    ):
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        delta = r.get("delta_pct")
        d = "" if delta is None else f"{delta:+.2f}% ± {r['delta_se_pct']:.2f}"
        gap = r.get("gap_recovered")
        t.add_row(
            label_of(r),
            f"{r['bits_per_element']:.2f}",
            _fmt_bytes(r["kv_bytes"]),
            _fmt_ppl(r),
            d,
            "" if gap is None else f"{100 * gap:.1f}%",
        )
    return t


def print_table(results: list[dict], title: str = "") -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # pipes and logs default to 80 columns: too narrow, rows wrap
        console = Console(width=130)
    console.print(build_table(results, title))


def percent_tick_step(span: float, max_ticks: int = 8) -> float:
    """A tick step (as a ratio) of a whole 1, 2 or 5 x 10^k percent with at most ``max_ticks``
    ticks over ``span``: every tick then sits exactly at the percent its label prints (an
    automatic locator put ticks at 1.025 and labelled them "+3%")."""
    step = 0.01  # 1%
    for mult in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
        step = 0.01 * mult
        if span / step <= max_ticks:
            break
    return step


def percent_label(x: float) -> str:
    """Ratio -> signed whole percent (``1.03`` -> ``"+3%"``)."""
    return f"{round(100 * (x - 1)):+d}%"


def plot_results(results: list[dict], path: str, title: str = "") -> None:
    """Horizontal bars of perplexity / reference, bits per element in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    add_comparisons(results)
    rows = [r for r in results if "ratio" in r]
    if not rows:
        raise ValueError("nothing to plot: no reference method (auto or bf16) among the results")
    labels = [f"{label_of(r)}  ({r['bits_per_element']:.2f} b)" for r in rows]
    ratios = [r["ratio"] for r in rows]
    colors = [
        "tab:green" if x <= 1.03 else "tab:orange" if x <= 1.10 else "tab:red" for x in ratios
    ]
    # Linear scale around 1; a collapsed method (naive INT4 on Qwen2.x) runs off the right edge
    # with its real ratio printed, so the near-lossless ones stay readable.
    right = min(max(ratios) * 1.02, 1.25)
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [min(x, right) - 1 for x in ratios], left=1, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    left, xmax = min(0.99, min(ratios) - 0.005), right + 0.04 * (right - 1)
    ax.set_xlim(left, xmax)
    # ticks at whole percents only, so each label names the position it marks
    ax.xaxis.set_major_locator(MultipleLocator(percent_tick_step(xmax - left), offset=1.0))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: percent_label(x)))
    ax.axvline(1.03, color="gray", ls="--", lw=1, label="+3%")
    ax.set_xlabel("perplexity vs unquantized KV")
    for i, x in enumerate(ratios):
        if x <= right:
            ax.text(x, i, f" {100 * (x - 1):+.1f}%", va="center", fontsize=7)
        else:  # clipped: the real ratio, inside the bar
            text = f"{100 * (x - 1):+.1f}% → " if x < 2 else f"×{x:,.0f} → "
            ax.text(right, i, text, va="center", ha="right", fontsize=7, color="white")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
