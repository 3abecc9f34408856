"""KV memory accounting for reports: bytes a token set holds under a method vs BF16."""

from __future__ import annotations

from dataclasses import replace

from sawkv.quant.methods import parse_method


def kv_memory_report(engine, num_tokens: int) -> str:
    """One line: KV bytes of ``num_tokens`` tokens under the engine's method vs BF16 pages."""
    spec = engine.spec
    bf16 = replace(spec, method=parse_method("bf16", spec.head_dim))
    held, ref = num_tokens * spec.bytes_per_token, num_tokens * bf16.bytes_per_token
    bits = spec.method.bits_per_element(spec.head_dim)
    pool_tokens = engine.block_manager.num_blocks * spec.block_size
    return (
        f"KV cache: {num_tokens} tokens hold {held / 1024:.1f} KiB with {spec.method.name} "
        f"({bits:.2f} bits/element incl. scales) vs {ref / 1024:.1f} KiB in BF16 "
        f"({ref / held:.2f}x less); the pool holds {pool_tokens} tokens "
        f"({pool_tokens * spec.bytes_per_token / 2**20:.0f} MiB)"
    )
