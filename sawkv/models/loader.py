"""Model construction and weights: presets (dummy weights), HF safetensors directories.

``resolve_model(name)`` -> (:class:`ModelConfig`, directory or None); ``build_model`` builds the
module on the device in the target dtype and fills it from safetensors or random values.
"""

from __future__ import annotations

import contextlib
import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from sawkv.attention.backend import AttentionBackend
from sawkv.config import ModelConfig
from sawkv.models.gemma3 import Gemma3CausalLM
from sawkv.models.layers import FusedLinear, RMSNorm
from sawkv.models.llama import CausalLM

MODEL_CLASSES = {"llama": CausalLM, "qwen2": CausalLM, "qwen3": CausalLM, "gemma3": Gemma3CausalLM}
# HF projection -> (our fused module, shard index)
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_SKIP = ("rotary_emb.", "vision_tower.", "multi_modal_projector.", "vision_model.")


def preset_names() -> list[str]:
    files = resources.files("sawkv.models").joinpath("presets").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json"))


def load_preset(name: str) -> dict | None:
    """The HF config dict of a shipped preset (``qwen3-8b`` ...), or None."""
    f = resources.files("sawkv.models").joinpath("presets", f"{name.lower()}.json")
    return json.loads(f.read_text()) if f.is_file() else None


def resolve_model(name_or_path: str) -> tuple[ModelConfig, Path | None]:
    """Preset name -> (config, None); a directory or registry name -> (config, its directory)."""
    preset = load_preset(name_or_path)
    if preset is not None:
        return ModelConfig.from_hf_dict(preset), None
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        from sawkv.models.hub import resolve_model_dir

        path = Path(resolve_model_dir(name_or_path))
    return ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text())), path


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(
    cfg: ModelConfig,
    model_dir: Path | None,
    backend: AttentionBackend,
    *,
    dtype: torch.dtype,
    device: torch.device,
    max_len: int,
    seed: int = 0,
) -> nn.Module:
    """Instantiate on ``device`` in ``dtype``; safetensors from ``model_dir`` or dummy weights."""
    with _default_dtype(dtype), torch.device(device):
        model = MODEL_CLASSES[cfg.architecture](cfg, backend, max_len)
    if model_dir is None:
        init_dummy(model, seed)
    else:
        load_safetensors(model, model_dir)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def init_dummy(model: nn.Module, seed: int) -> None:
    """Random weights with a stable scale (normal, std 0.02; norms at identity)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, RMSNorm):
            mod.weight.fill_(0.0 if mod.offset else 1.0)
        elif isinstance(mod, nn.Linear | nn.Embedding):
            mod.weight.normal_(0.0, 0.02, generator=gen)
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()


def _map_name(name: str) -> tuple[str, int | None] | None:
    """HF tensor name -> (our parameter name, shard index or None); None to skip."""
    if any(s in name for s in _SKIP):
        return None
    for p in _PREFIXES:
        if name.startswith(p):
            name = name[len(p) :]
            break
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in FUSED:
            fused, shard = FUSED[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1 :]), shard
    return name, None


@torch.no_grad()
def load_safetensors(model: nn.Module, model_dir: Path, transform=None) -> None:
    """Copy every tensor of ``model_dir/*.safetensors`` into ``model`` (fused shards placed).

    ``transform(name, shard, tensor) -> tensor``, if given, maps each checkpoint tensor before
    it is copied (tensor parallelism uses it to keep this rank's slice).
    """
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir}")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    missing = set(params)
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                mapped = _map_name(hf_name)
                if mapped is None or (
                    mapped[0] == "lm_head.weight" and "lm_head.weight" not in params
                ):
                    continue  # tied embeddings: the checkpoint may still carry lm_head
                name, shard = mapped
                if name not in params:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has no place in the model")
                tensor = f.get_tensor(hf_name)
                if transform is not None:
                    tensor = transform(name, shard, tensor)
                _copy(params[name], tensor, modules, name, shard)
                missing.discard(name)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks weights for {sorted(missing)[:8]}")


def _copy(param, tensor, modules, name: str, shard: int | None) -> None:
    if shard is None:
        if param.shape != tensor.shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}"
            )
        param.copy_(tensor)
        return
    mod: FusedLinear = modules[name.rsplit(".", 1)[0]]
    start = sum(mod.out_sizes[:shard])
    size = mod.out_sizes[shard]
    if tensor.shape[0] != size:
        raise ValueError(
            f"{name} shard {shard}: checkpoint has {tensor.shape[0]} rows, need {size}"
        )
    param[start : start + size].copy_(tensor)
