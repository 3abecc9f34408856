"""Shared fixtures: the real SmolLM2-135M directory and tokenizer (skipped if not installed)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    from sawkv.models.hub import ModelNotInstalledError, resolve_model_dir

    try:
        return resolve_model_dir("smollm2-135m")
    except ModelNotInstalledError as e:
        pytest.skip(f"SmolLM2-135M not installed: {e}")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))
