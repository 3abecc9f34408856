"""Key-mean calibration: equals a hand-computed post-RoPE mean, shapes, storage, disjointness."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sawkv.eval.calibrate import (
    calibrate_key_means,
    get_key_means,
    key_means_path,
    keys_mean,
    load_key_means,
)
from sawkv.eval.data import load_text, token_windows, window_ranges
from sawkv.models.hub import cache_dir, load_hf_model, resolve_model_dir


@pytest.fixture(scope="module")
def smol():
    return load_hf_model("smollm2-135m")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh SAWKV_CACHE root that still sees the installed texts; the model is given by path
    so its key means land in tmp_path, never in the user's cache."""
    real = cache_dir()
    (tmp_path / "data").symlink_to(real / "data")
    (tmp_path / "pkgs").symlink_to(real / "pkgs")
    model_dir = str(resolve_model_dir("smollm2-135m"))
    monkeypatch.setenv("SAWKV_CACHE", str(tmp_path))
    return model_dir


@torch.no_grad()
def manual_keys_mean(model, windows):
    """k_proj output (hooked) -> heads -> RoPE by hand -> mean over all tokens."""
    attn_layers = [layer.self_attn for layer in model.model.layers]
    grabbed = []
    hooks = [a.k_proj.register_forward_hook(lambda m, i, o: grabbed.append(o)) for a in attn_layers]
    cfg = model.config
    num_kv, head_dim = cfg.num_key_value_heads, cfg.head_dim
    total = 0
    try:
        for w in windows:
            grabbed.clear()
            model(w[None], use_cache=False)
            pos = torch.arange(w.numel())[None]
            x = torch.zeros(1, w.numel(), cfg.hidden_size)
            cos, sin = model.model.rotary_emb(x, pos)
            ks = []
            for k in grabbed:
                k = k.view(1, -1, num_kv, head_dim).transpose(1, 2)
                k, _ = apply_rotary_pos_emb(k, k, cos, sin)
                ks.append(k[0].sum(dim=1))  # [H, D]
            total = total + torch.stack(ks)
    finally:
        for h in hooks:
            h.remove()
    return total / windows.numel()


def test_keys_mean_equals_hand_computed_post_rope_mean(smol):
    model, tok = smol
    windows = token_windows(tok, "austen", 128, 64, split="calib")
    got = keys_mean(model, windows)
    assert got.shape == (30, 3, 64)  # [num_layers, num_kv_heads, head_dim]
    torch.testing.assert_close(got, manual_keys_mean(model, windows), atol=1e-4, rtol=1e-4)
    assert got.abs().max() > 0.5  # real keys have offsets worth removing


def test_calibrate_saves_and_loads(smol, private_cache, tmp_path):
    model, tok = smol
    assert load_key_means(private_cache) is None
    mu = calibrate_key_means(model, tok, private_cache, num_tokens=128, window_len=64)
    path = key_means_path(private_cache)
    assert path.is_file() and tmp_path in path.parents
    torch.testing.assert_close(load_key_means(private_cache), mu, atol=0, rtol=0)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"text": "austen", "num_tokens": "128", "window_len": "64"}
    assert torch.equal(get_key_means(model, tok, private_cache), mu)  # cached, not recomputed


def test_calibration_windows_never_overlap_eval_windows(smol):
    _, tok = smol
    n = len(tok(load_text("austen"), add_special_tokens=False)["input_ids"])
    calib = window_ranges(n, 8192, 1024, split="calib")
    evals = window_ranges(n, 8192, 1024, split="eval")
    assert max(e for _, e in calib) <= min(s for s, _ in evals)
    # and by content: no 32-token run of a calibration window appears in an eval window
    c = token_windows(tok, "austen", 1024, 256, split="calib")
    v = token_windows(tok, "austen", 1024, 256, split="eval")
    grams = {tuple(w[i : i + 32].tolist()) for w in v for i in range(0, 256 - 32)}
    assert not any(tuple(w[i : i + 32].tolist()) in grams for w in c for i in range(256 - 32))


def test_no_model_name_gives_zeros_with_warning(smol):
    model, _ = smol
    with pytest.warns(UserWarning, match="mu = 0"):
        mu = get_key_means(model, None, None)
    assert mu.shape == (30, 3, 64) and not mu.any()


def test_keys_mean_rejects_bad_windows(smol):
    with pytest.raises(ValueError, match="num_windows, window_len"):
        keys_mean(smol[0], torch.zeros(5, dtype=torch.long))
