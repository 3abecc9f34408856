"""Fixtures shared by every test directory."""

from __future__ import annotations

import json

import pytest

# A two-layer Qwen3 with random ("dummy") weights: the engine's real code paths at toy size.
_TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "vocab_size": 512, "max_position_embeddings": 512, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """``tiny_qwen3(**overrides) -> str``: a model directory holding only a Qwen3
    ``config.json`` (the toy shape above with ``overrides``), for ``load_format="dummy"``."""

    def make(**overrides) -> str:
        path = tmp_path_factory.mktemp("qwen3tiny")
        (path / "config.json").write_text(json.dumps({**_TINY_QWEN3, **overrides}))
        return str(path)

    return make


@pytest.fixture
def plan_and_upload():
    """``plan_and_upload(planner, table, tables, starts, q_lens, block_size=16) -> StepContext``:
    one step of sequences with page tables ``tables`` computing ``q_lens`` tokens from
    ``starts``, planned on the host and uploaded as the model runner does it."""
    from types import SimpleNamespace

    from sawkv.engine.device_step import upload

    def run(planner, table, tables, starts, q_lens, block_size=16):
        seqs = [
            SimpleNamespace(request_id=f"s{i}", token_ids=[0] * (a + q), num_tokens=a + q,
                            num_computed_tokens=a, block_table=t)
            for i, (t, a, q) in enumerate(zip(tables, starts, q_lens))
        ]  # fmt: skip
        return upload(planner.plan(seqs, list(q_lens)), table, block_size).ctx

    return run
