"""Cross-device check for the saw-int4 summary: `auto` NLL of the first evaluation window of
each text on this CPU against the H100 study's (the summary pairs CPU saw-int4 results with
H100 `auto` windows).

    PYTHONPATH=. .venv/bin/python benchmarks/saw_int4_device_check.py MODEL [TEXT...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sawkv.eval.tasks import run_perplexity
from sawkv.models.hub import load_hf_model

ROOT = Path(__file__).parent / "results"


def main(model_name: str, texts: list[str]) -> None:
    model, tok = load_hf_model(model_name)
    out_path = ROOT / "saw_int4" / "device_check.json"
    out = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for text in texts:
        cpu = run_perplexity(model, tok, text, "auto", None, 1024, 1024)["window_nll"][0]
        h100_file = ROOT / "study_h100" / f"study_{model_name}" / f"auto__ppl-{text}.json"
        h100 = json.loads(h100_file.read_text())["window_nll"][0]
        out[f"{model_name}/{text}"] = {"cpu_nll": cpu, "h100_nll": h100, "diff": cpu - h100}
        print(f"{model_name} {text}: window 0 NLL cpu {cpu:.6f} h100 {h100:.6f} "
              f"({100 * (cpu - h100):+.4f}% of ppl)")  # fmt: skip
    out_path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["austen"])
