"""Frozen configuration dataclasses: model shape, KV cache, scheduler, engine.

``ModelConfig`` is read from a HF ``config.json`` (dict); the others are user settings validated in
``__post_init__``. Only :meth:`EngineConfig.from_args` takes ``**kwargs``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
}
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"float16"``/``torch.float32``... -> torch dtype (ValueError if unknown)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(DTYPES)}")
    return DTYPES[dtype]


def _rope_params(cfg: dict, kind: str | None = None) -> dict:
    """transformers 5 nests RoPE settings in ``rope_parameters`` (per layer type for Gemma3)."""
    rp = cfg.get("rope_parameters") or {}
    if kind is not None and isinstance(rp.get(kind), dict):
        return rp[kind]
    if rp and all(isinstance(v, dict) for v in rp.values()):
        return next(iter(rp.values()))
    return rp


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer, as read from a HF ``config.json``.

    ``layer_types[i]`` is "full" or "sliding"; sliding layers see the last ``sliding_window``
    tokens (Gemma3) and use ``rope_local_theta``.
    """

    architecture: str  # "llama" | "qwen2" | "qwen3" | "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # sorted (key, value) pairs of HF rope_scaling (llama3 etc.)
    rope_local_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int = 0
    layer_types: tuple[str, ...] = ()
    query_pre_attn_scalar: float | None = None
    hidden_act: str = "silu"
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries, need {self.num_layers}"
            )

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer_idx: int) -> int:
        """Sliding window of a layer (0 = full attention)."""
        return self.sliding_window if self.layer_types[layer_idx] == "sliding" else 0

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied), for roofline estimates."""
        h, q, kv = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        attn = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp) + emb

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF ``config.json`` (Llama, Mistral, Qwen2, Qwen3, Gemma3)."""
        archs = cfg.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            arch = {
                "llama": "llama",
                "qwen2": "qwen2",
                "qwen3": "qwen3",
                "gemma3_text": "gemma3",
            }.get(cfg.get("model_type", ""), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')}; supported: "
                f"{sorted(ARCHITECTURES)}"
            )
        if "text_config" in cfg:  # multimodal Gemma3 wrapper: the LM lives in text_config
            cfg = {**cfg["text_config"], "architectures": archs}
        return cls(**_fields_from_hf(cfg, arch))


def _fields_from_hf(cfg: dict, arch: str) -> dict:
    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    num_layers = cfg["num_hidden_layers"]
    rp = _rope_params(cfg, "full_attention")
    rope_theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or {k: v for k, v in rp.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    local = _rope_params(cfg, "sliding_attention")
    local_theta = cfg.get("rope_local_base_freq", local.get("rope_theta", rope_theta))
    window = cfg.get("sliding_window") or 0
    if arch == "gemma3":
        types = cfg.get("layer_types") or [
            "full_attention" if (i + 1) % cfg.get("sliding_window_pattern", 6) == 0 else "sliding"
            for i in range(num_layers)
        ]
        layer_types = tuple("sliding" if "sliding" in t else "full" for t in types)
    else:
        # Llama/Qwen2/Qwen3 ship ``sliding_window`` with use_sliding_window false: full attention.
        window = window if cfg.get("use_sliding_window", False) else 0
        layer_types = ("sliding" if window else "full",) * num_layers
    eos = cfg.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"
    return dict(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, list))),
        rope_local_theta=float(local_theta),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=cfg.get("tie_word_embeddings", arch == "gemma3"),
        attention_bias=cfg.get("attention_bias", arch == "qwen2"),
        qk_norm=arch in ("qwen3", "gemma3"),
        sliding_window=window,
        layer_types=layer_types,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if arch == "gemma3" else None,
        hidden_act=act,
        eos_token_ids=eos,
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
    )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache settings.

    The page count comes from, in order: ``num_gpu_blocks``; ``kv_cache_memory_bytes``; on GPU
    ``gpu_memory_utilization`` of total memory minus what the model and a warm-up step use; on
    CPU ``cpu_kv_cache_bytes``.
    """

    kv_cache_dtype: str = "auto"
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    cpu_kv_cache_bytes: int = 512 << 20
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(
                f"kv_cache_memory_bytes must be >= 1, got {self.kv_cache_memory_bytes}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: sequences per step and tokens per step (chunked prefill)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs. ``model`` is a preset name, a registry name or a directory.

    ``load_format`` "auto" reads safetensors; "dummy" fills random weights (speed runs).
    ``attention_backend`` "auto" picks triton on CUDA and torch elsewhere.
    ``batch_invariant``: run every linear as fixed-size GEMM tiles so a request's greedy output
    does not depend on what else is in the batch (:mod:`sawkv.models.batch_invariant`); None
    means on for a CPU engine without tensor parallelism, off elsewhere. CPU only: the Triton
    kernels and cuBLAS pick their split from the batch.
    ``async_scheduling``: plan step N+1 while the device runs step N; None means on for a CUDA
    engine of one rank (on a CPU the host is the device, so there is nothing to overlap).
    """

    model: str
    dtype: str = "auto"  # "auto": bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    load_format: str = "auto"
    attention_backend: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs, no torch.compile
    enable_compile: bool = True  # fuse norms / RoPE / SiLU with torch.compile on CUDA
    seed: int = 0
    tensor_parallel_size: int = 1  # ranks sharing heads, MLP and vocabulary (sawkv.distributed)
    batch_invariant: bool | None = None
    # overlap the host's scheduling of step N+1 with the device's step N (a sampled token is a
    # device-side placeholder until the next step is launched; see LLMEngine._step_async).
    # None: on for a CUDA engine of one rank (D(256,1024) on an H100: +13-21% output tok/s for
    # bf16 and int4-bdr128 at c=1 and c=64, benchmarks/results/async_scheduling_h100.json)
    async_scheduling: bool | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(
                f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}"
            )
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError("async_scheduling does not support tensor_parallel_size > 1 yet")
        if self.batch_invariant and (
            self.torch_device.type != "cpu" or self.tensor_parallel_size > 1
        ):
            raise ValueError(
                "batch_invariant needs a CPU engine without tensor parallelism (got device "
                f"{self.torch_device}, tensor_parallel_size={self.tensor_parallel_size})"
            )

    @property
    def is_async_scheduling(self) -> bool:
        """``async_scheduling`` with None resolved (on for CUDA and one rank)."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.torch_device.type == "cuda" and self.tensor_parallel_size == 1

    @property
    def is_batch_invariant(self) -> bool:
        """``batch_invariant`` with None resolved (on for CPU and one rank)."""
        if self.batch_invariant is not None:
            return self.batch_invariant
        return self.torch_device.type == "cpu" and self.tensor_parallel_size == 1

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return parse_dtype(self.dtype)

    @classmethod
    def from_args(cls, model: str, kv_cache_dtype: str = "auto", **kwargs) -> EngineConfig:
        """Flat keyword arguments -> nested config; unknown names raise ValueError."""
        groups = {"cache": CacheConfig, "scheduler": SchedulerConfig}
        sub: dict[str, dict] = {"cache": {"kv_cache_dtype": kv_cache_dtype}, "scheduler": {}}
        own = {f.name for f in dataclasses.fields(cls)} - set(groups) - {"model"}
        top = {}
        for key, value in kwargs.items():
            dest = next(
                (g for g, c in groups.items() if key in {f.name for f in dataclasses.fields(c)}),
                None,
            )
            if dest is not None:
                sub[dest][key] = value
            elif key in own:
                top[key] = value
            else:
                raise ValueError(f"unknown engine argument {key!r}")
        return cls(
            model=model,
            cache=CacheConfig(**sub["cache"]),
            scheduler=SchedulerConfig(**sub["scheduler"]),
            **top,
        )
