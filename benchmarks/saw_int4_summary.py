"""Summarize saw-int4 perplexity against full-precision KV and the two baselines.

Reads the study JSONs (one per model x method x text, 8 x 1,024-token evaluation windows, the
study code path ``sawkv report --size gpu``):

* ``saw-int4`` (and any ``auto`` recomputed here) from ``benchmarks/results/saw_int4/``,
  computed on this CPU by ``sawkv calibrate`` + ``sawkv report`` (see ``saw_int4.md``);
* ``auto``, ``int4-bdr64-kv-kc`` and ``mixed4.5-s4`` from the H100 study
  (``benchmarks/results/study_h100/``): same windows, same code, fp32.

Writes ``benchmarks/results/saw_int4/summary.json`` and prints a markdown table. Changes are
paired over the same windows (``sawkv.eval.table.paired_delta``).

    PYTHONPATH=. .venv/bin/python benchmarks/saw_int4_summary.py
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from sawkv.eval.table import paired_delta

ROOT = Path(__file__).parent / "results"
OURS, H100 = ROOT / "saw_int4", ROOT / "study_h100"
MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
TEXTS = ("austen", "paulgraham", "wikipedia")
MIXED = {"smollm2-135m": "mixed4.5-bdr64-s4", "qwen2.5-coder-0.5b": "mixed4.5-bdr64-s4"}


def load(root: Path, model: str, method: str, text: str) -> dict | None:
    path = root / f"study_{model}" / f"{method}__ppl-{text}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def cell(res: dict | None, ref: dict | None) -> dict | None:
    if res is None or ref is None:
        return None
    pct, se = paired_delta(res, ref)
    return {
        "ppl": res["ppl"],
        "delta_pct": pct,
        "delta_se_pct": se,
        "bits_per_element": res.get("bits_per_element"),
        "device": res.get("device"),
    }


def summarize(ours: Path = OURS) -> dict:
    out: dict = {}
    for model in MODELS:
        recipe_file = ours / f"recipe_{model}.json"
        entry: dict = {"texts": {}}
        if recipe_file.is_file():
            rec = json.loads(recipe_file.read_text())
            entry["recipe"] = {k: rec[k] for k in ("layers", "bits_per_element", "budget")}
            entry["recipe"]["int8_layers"] = rec["info"]["int8_layers"]
            entry["recipe"]["kl_all_int4"] = rec["info"]["kl_all_int4"]
            entry["recipe"]["kl_recipe"] = rec["info"]["kl_recipe"]
        mixed = MIXED.get(model, "mixed4.5-bdr128-s4")
        for text in TEXTS:
            ref = load(ours, model, "auto", text) or load(H100, model, "auto", text)
            res = load(ours, model, "saw-int4", text)
            row = {
                "auto_ppl": None if ref is None else ref["ppl"],
                "auto_device": None if ref is None else ref.get("device"),
                "saw-int4": cell(res, ref),
                "int4-bdr64-kv-kc": cell(
                    load(H100, model, "int4-bdr64-kv-kc", text), load(H100, model, "auto", text)
                ),
                "mixed4.5-s4": cell(
                    load(H100, model, mixed, text), load(H100, model, "auto", text)
                ),
            }
            if res is not None:
                row["saw_int4_commit"], row["saw_int4_date"] = res.get("commit"), res.get("date")
            entry["texts"][text] = row
        out[model] = entry
    return out


def fmt(c: dict | None) -> str:
    return "–" if c is None else f"{c['delta_pct']:+.1f}% ± {c['delta_se_pct']:.1f}"


def markdown(summary: dict) -> str:
    lines = [
        "| model | text | `auto` ppl | **saw-int4** | int4-bdr64-kv-kc | mixed4.5-s4 |",
        "|---|---|---|---|---|---|",
    ]
    for model, entry in summary.items():
        for text, row in entry["texts"].items():
            if row["saw-int4"] is None and row["int4-bdr64-kv-kc"] is None:
                continue
            auto = "–" if row["auto_ppl"] is None else f"{row['auto_ppl']:.2f}"
            lines.append(
                f"| {model} | {text} | {auto} | **{fmt(row['saw-int4'])}** | "
                f"{fmt(row['int4-bdr64-kv-kc'])} | {fmt(row['mixed4.5-s4'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", type=Path, default=OURS, help="saw-int4 results directory")
    args = ap.parse_args()
    summary = summarize(args.ours)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "windows": "8 x 1024 tokens per text, evaluation split",
        "models": summary,
    }
    (args.ours / "summary.json").write_text(json.dumps(doc, indent=1))
    print(markdown(summary))


if __name__ == "__main__":
    main()
