"""Benchmark rows on disk and on screen: ``{"runs": [...]}`` JSON (merged by key), a rich
table, and a matplotlib plot of output tok/s, TTFT and TPOT against concurrency."""

from __future__ import annotations

import json
from pathlib import Path

# A row is replaced, not duplicated, when a later run has the same values of these fields.
ROW_KEY = ("mode", "method", "input_len", "output_len", "concurrency")


def row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ROW_KEY)


def merge_runs(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows with every row of ``new`` added; a new row replaces an old one of the same
    :data:`ROW_KEY`. Order: old rows first (in place when replaced), then the new ones."""
    index = {row_key(r): i for i, r in enumerate(old)}
    out = list(old)
    for row in new:
        i = index.get(row_key(row))
        if i is None:
            index[row_key(row)] = len(out)
            out.append(row)
        else:
            out[i] = row
    return out


def save_runs(path: Path, rows: list[dict], *, append: bool = False, **meta) -> dict:
    """Write ``{**meta, "runs": rows}`` atomically; with ``append`` merge into the file's runs."""
    data: dict = {}
    if append and path.is_file():
        data = json.loads(path.read_text())
        if not isinstance(data.get("runs"), list):
            raise ValueError(f"{path} has no top-level 'runs' list")
    data.update(meta)
    data["runs"] = merge_runs(data.get("runs", []), rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return data


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict], title: str = "sawkv bench") -> None:
    """One line per row: throughput, TTFT / TPOT / ITL percentiles, the server's own mean TTFT
    (where it exports latency histograms), errors."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    cols = ("mode", "method", "in", "out", "conc", "reqs", "req/s", "out tok/s", "tot tok/s",
            "TTFT p50 s", "TTFT p99 s", "srv TTFT s", "TPOT p50 ms", "ITL p99 ms",
            "err")  # fmt: skip
    for c in cols:
        table.add_column(c, justify="left" if c in ("mode", "method") else "right")
    for r in rows:
        table.add_row(
            r["mode"], str(r["method"]), str(r["input_len"]), str(r["output_len"]),
            str(r["concurrency"]), str(r["num_requests"]), _fmt(r["request_s"], ".2f"),
            _fmt(r["output_tok_s"], ".1f"), _fmt(r["total_tok_s"], ".1f"),
            _fmt(r["ttft_s"]["p50"], ".3f"), _fmt(r["ttft_s"]["p99"], ".3f"),
            _fmt(r.get("server_ttft_mean_s"), ".3f"), _fmt(r["tpot_ms"]["p50"], ".2f"),
            _fmt(r["itl_ms"]["p99"], ".2f"), str(r["errors"]),
        )  # fmt: skip
    Console(width=max(Console().width, 160)).print(table)


def plot_runs(rows: list[dict], path: Path, title: str = "") -> None:
    """One column per workload D(input_len, output_len); rows: output tok/s, TTFT p50 and
    TPOT p50 against concurrency (log2), one line per (mode, method). Writes a PNG."""
    fig = runs_figure(rows, title)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def runs_figure(rows: list[dict], title: str = ""):
    """The figure of :func:`plot_runs`. A method keeps one color in every panel (a workload
    that some methods did not run must not shift the others' colors), and each column has a
    legend of the lines it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({(r["input_len"], r["output_len"]) for r in rows})
    if not workloads:
        raise ValueError("no rows to plot")
    keys = sorted({(r["mode"], str(r["method"])) for r in rows})
    methods = sorted({method for _, method in keys})
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    fields = (("output_tok_s", None, "output tok/s"), ("ttft_s", "p50", "TTFT p50 (s)"),
              ("tpot_ms", "p50", "TPOT p50 (ms)"))  # fmt: skip
    fig, axes = plt.subplots(3, len(workloads), figsize=(4.5 * len(workloads), 9), squeeze=False)
    for col, (il, ol) in enumerate(workloads):
        lines: dict[tuple, list[dict]] = {}
        for r in rows:
            if (r["input_len"], r["output_len"]) == (il, ol):
                lines.setdefault((r["mode"], str(r["method"])), []).append(r)
        for (mode, method), rs in sorted(lines.items()):
            rs.sort(key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in rs]
            for ax, (name, pct, label) in zip(axes[:, col], fields):
                ys = [r[name] if pct is None else r[name][pct] for r in rs]
                ax.plot(xs, ys, "o-" if mode == "http" else "x--", color=color[method],
                        label=f"{method} ({mode})")  # fmt: skip
                ax.set_ylabel(label)
        axes[0, col].set_title(f"D({il}, {ol})")
        axes[0, col].legend(fontsize=7)
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
