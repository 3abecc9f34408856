"""Choose a stored saw-int4 recipe's attention sinks (calibration step 5 alone) and save it.

Recipes calibrated before sinks were part of ``sawkv calibrate`` load with no sinks; this
scores 0, 1 and 4 exact first tokens by KL on the same calibration windows (no evaluation
token) and stores the best, exactly as a fresh calibration would:

    PYTHONPATH=. python benchmarks/saw_int4_sinks.py MODEL [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--json", type=Path, help="also write the recipe's JSON here")
    args = ap.parse_args()
    from sawkv.eval.calibrate_recipe import choose_num_sink
    from sawkv.models.calibration import load_recipe, recipe_path
    from sawkv.models.hub import load_hf_model

    recipe = load_recipe(args.model)
    if recipe is None:
        raise SystemExit(f"no stored recipe for {args.model}: run `sawkv calibrate` first")
    model, tok = load_hf_model(args.model)
    with torch.no_grad():
        recipe = choose_num_sink(model, tok, recipe)
    recipe.save(recipe_path(args.model))
    print(f"{args.model}: num_sink {recipe.num_sink}, KL by sinks {recipe.info['kl_sinks']}")
    if args.json:
        args.json.write_text(json.dumps(recipe.to_json(), indent=1) + "\n")


if __name__ == "__main__":
    main()
