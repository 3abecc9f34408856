"""Accuracy sweep: perplexity of every KV method on 8 x 1024 tokens of Austen, per model.

    .venv/bin/python benchmarks/accuracy.py smollm2-135m          # run (resumable) + table + plot
    .venv/bin/python benchmarks/accuracy.py qwen2.5-coder-1.5b
    .venv/bin/python benchmarks/accuracy.py qwen2.5-coder-1.5b --replot   # table/plot from JSON

Methods run in priority order and the JSON is rewritten after each one, so a killed run resumes
where it stopped (``--resume``); the table and plot list them in :data:`DISPLAY_ORDER`.
Results: ``benchmarks/results/accuracy_<model>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# Priority order (what to run first when CPU time is short). "@prefill": prefill-mean centering.
METHODS = {
    "smollm2-135m": [
        "auto",
        "int4",
        "int4-bdr64-kc",
        "int4-bdr64-kv-kc",
        "int4-bdr64",
        "int8",
        "int4-bdr64-kv",
        "int4-bdr64-kv-kc@sink1",
        "int4-bdr64-kc@sink1",
        "int4-kc",
        "int4-bdr32-kc",
        "int4-bdr16-kc",
        "int4-bdr64-kc@prefill",
        "fp8",
        "int4-g32",
        "int3-bdr-kv-kc",
        "int2-bdr-kv-kc",
        "int4-bdr32-kv-kc",
        "int4-bdr16-kv-kc",
        "int4-bdr16",
        "int4-bdr32",
        "int4-bdr16-kv",
        "int4-bdr32-kv",
        "int4-g32-kc",
        "int3-bdr-kc",
        "int2-bdr-kc",
        "int4-bdr64-kv-kc@prefill",
        "bf16",
    ],
    "qwen2.5-coder-1.5b": [
        "auto",
        "int4-bdr128-kc",
        "int4-bdr128-kv-kc",
        "int4",
        "int4-bdr128",
        "int8",
        "int4-bdr64-kc",
        "int4-bdr64-kv-kc",
        "int4-kc",
        "int4-bdr64",
        "fp8",
        "bf16",
        "int4-bdr128-kv-kc@prefill",
        "int4-bdr128-kv-kc@sink1",
        "int4-bdr32-kc",
        "int4-bdr16-kc",
        "int4-g32",
        "int4-bdr128-kv",
        "int3-bdr-kc",
        "int2-bdr-kc",
        "int4-bdr32",
        "int4-bdr16",
        "int4-bdr64-kv",
        "int4-bdr32-kv-kc",
        "int4-bdr16-kv-kc",
    ],
}


def display_key(label: str) -> tuple:
    """Sort: references, float/8-bit, naive int4, then by centering, K+V, block size, bits."""
    name, _, mode = label.partition("@")
    parts = name.split("-")
    head = parts[0]
    order = {"auto": 0, "bf16": 1, "fp16": 1, "fp8": 2, "int8": 3}
    if head in order:
        return (order[head], 0, 0, 0, 0, 0, label)
    bits = int(head[3:])
    had = next((int(p[3:] or 128) for p in parts if p.startswith("bdr")), 0)
    grp = next((int(p[1:]) for p in parts if p.startswith("g")), 0)
    return (
        4 + (4 - bits) if bits < 4 else 4,
        "kc" in parts,
        "kv" in parts,
        grp,
        had,
        mode == "prefill",
        label,
    )


# Qwen-1.5B runs in bf16 (weights and activations; "auto" = bf16 KV): ~2.4x faster than fp32 on
# this CPU (AVX512-BF16), which is what makes its sweep fit. SmolLM2 is cheap: fp32.
DTYPES = {"smollm2-135m": "float32", "qwen2.5-coder-1.5b": "bfloat16"}


def run(model: str, tokens: int, window: int) -> None:
    out = RESULTS / f"accuracy_{model}.json"
    cmd = [
        sys.executable,
        "-m",
        "sawkv.cli",
        "eval",
        "--model",
        model,
        "--methods",
        ",".join(METHODS[model]),
        "--text",
        "austen",
        "--tokens",
        str(tokens),
        "--window",
        str(window),
        "--json",
        str(out),
        "--resume",
        "--dtype",
        DTYPES[model],
    ]
    subprocess.run(cmd, check=True)


def replot(model: str) -> None:
    from sawkv.eval.table import plot_results, print_table

    path = RESULTS / f"accuracy_{model}.json"
    data = json.loads(path.read_text())
    results = sorted(data["results"], key=lambda r: display_key(r["label"]))
    n = results[0]["num_windows"]
    title = (
        f"{model} · {data['text']} · {n}×{data['window']} tokens · no BOS · "
        f"{data['date'][:10]} · {data.get('commit')}"
    )
    print_table(results, title)
    plot_results(results, str(path.with_suffix(".png")), title)
    data["results"] = results
    path.write_text(json.dumps(data, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=sorted(METHODS))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--replot", action="store_true", help="only redraw table/plot from JSON")
    args = ap.parse_args()
    if not args.replot:
        run(args.model, args.tokens, args.window)
    replot(args.model)


if __name__ == "__main__":
    main()
