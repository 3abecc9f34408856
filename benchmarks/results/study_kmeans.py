"""Fit the k-means codebooks of the study on a GPU (Lloyd's k-means is slow on 2 CPU cores).

Three steps; the result is exactly what ``sawkv report`` would fit itself on CPU (same
calibration windows, same seeds and iterations: :meth:`KMeansMethod.fit`), only faster:

    # 1. here (CPU): capture calibration K/V of each model into .kmeans_carry/ (git-ignored)
    python benchmarks/results/study_kmeans.py capture smollm2-135m gemma3-270m qwen2.5-coder-0.5b
    # 2. device: fit every method on the GPU, codebooks to $OUT
    python benchmarks/results/study_kmeans.py fit --out $OUT kmeans4-d2 kmeans4-d2-bdr
    # 3. here: install the codebooks where sawkv.eval.artifacts looks for them
    python benchmarks/results/study_kmeans.py install <folder with the fitted files>
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

CARRY = Path(".kmeans_carry")


def capture(models: list[str]) -> None:
    from sawkv.eval.artifacts import CalibConfig, calib_windows, capture_kv
    from sawkv.models.hub import load_hf_model

    CARRY.mkdir(exist_ok=True)
    cfg = CalibConfig()
    for name in models:
        model, tok = load_hf_model(name)
        kv = capture_kv(model, calib_windows(tok, cfg))
        half = [(k.half(), v.half()) for k, v in kv]
        torch.save({"model": name, "tag": cfg.tag(), "kv": half}, CARRY / f"{name}.pt")
        print(f"captured {name}: {len(kv)} layers, K {tuple(kv[0][0].shape)}")


def fit(out: Path, methods: list[str]) -> None:
    from sawkv.quant import parse_method

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for path in sorted(CARRY.glob("*.pt")):
        blob = torch.load(path)
        kv = [(k.float().to(dev), v.float().to(dev)) for k, v in blob["kv"]]
        head_dim = kv[0][0].shape[-1]
        for name in methods:
            m = parse_method(name, head_dim)
            t0 = time.perf_counter()
            books = m.fit(kv).codebooks
            books = tuple(tuple(t.cpu() for t in layer) for layer in books)
            fname = f"{blob['model']}__codebooks_{m.name}_{blob['tag']}.pt"
            torch.save(books, out / fname)
            print(f"{blob['model']} {m.name}: {time.perf_counter() - t0:.1f} s on {dev}")


def install(folder: Path) -> None:
    from sawkv.models.hub import model_cache_dir

    for path in sorted(folder.glob("*__codebooks_*.pt")):
        model, fname = path.name.split("__", 1)
        dest = Path(model_cache_dir(model)) / fname
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())
        print(f"installed {dest}")


def main(argv: list[str]) -> None:
    cmd, *rest = argv
    if cmd == "capture":
        capture(rest)
    elif cmd == "fit":
        out = Path(rest[rest.index("--out") + 1])
        methods = [r for i, r in enumerate(rest) if r != "--out" and rest[i - 1] != "--out"]
        fit(out, methods)
    elif cmd == "install":
        install(Path(rest[0]))
    else:
        raise SystemExit(f"unknown command {cmd!r}: capture | fit | install")


if __name__ == "__main__":
    main(sys.argv[1:])
