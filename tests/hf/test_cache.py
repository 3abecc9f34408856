"""SawKVCache: same logits as an independent fake-quant reference, real stored bytes, generate.

The reference is a plain ``DynamicLayer`` that fake-quantizes each new K/V chunk with the raw
rotate / quantize / dequantize functions of ``sawkv.quant`` (tested there against the matrix
form), written here without ``KVMethod.encode``, INT4 packing or the cache's token-major layout.
It must use the same butterfly rotation: a matmul rounds differently and flips a few codes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from sawkv.hf import SawKVCache, attention_shape
from sawkv.hf.cache import cache_kwargs
from sawkv.quant import (
    dequantize_fp8,
    dequantize_int,
    parse_method,
    quantize_fp8,
    quantize_int,
    rotate,
)

METHODS = [
    "auto",
    "bf16",
    "fp8",
    "int8",
    "int4",
    "int4-bdr32",
    "int4-bdr-kv-kc",
    "int4-g32-kc",
    "int3-bdr-kc",
    "int2-bdr16",
    "int4-bdr-kv-kc-kh",
]


ATOL = 2e-5  # fp32 logits; only the order of float operations differs


def ref_fake_quant(x, method, mu=None, *, is_key):
    """``x [B, H, S, D]`` -> what attention should see; ``mu`` ``[H, D]`` or ``[B, H, 1, D]``."""
    if method.kind == "auto":
        return x
    if method.kind == "float":
        return x.to(torch.bfloat16 if method.dtype_name == "bf16" else torch.float16).to(x.dtype)
    y = x.float()
    if is_key and method.center_k and mu is not None:
        mu = mu[:, None, :] if mu.ndim == 2 else mu
        y = y - mu
    rot = method.had_block is not None and (is_key or method.rotate_v)
    if rot:
        y = rotate(y, method.had_block)
    if method.kind == "fp8":
        y = dequantize_fp8(*quantize_fp8(y))
    elif is_key and method.k_half_meta:  # -kh: each half of the rotated key on its own
        h = y.shape[-1] // 2
        y = torch.cat([dequantize_int(*quantize_int(y[..., :h], method.bits)),
                       dequantize_int(*quantize_int(y[..., h:], method.bits))], -1)  # fmt: skip
    else:
        y = dequantize_int(*quantize_int(y, method.bits, method.group_size))
    if rot:
        y = rotate(y, method.had_block)
    if is_key and method.center_k and mu is not None:
        y = y + mu
    return y.to(x.dtype)


class RefLayer(DynamicLayer):
    def __init__(self, method, mu=None, prefill_mean=False, num_sink=0):
        super().__init__()
        self.method, self.mu, self.prefill_mean = method, mu, prefill_mean
        self.num_sink, self.seen = num_sink, 0

    def update(self, k, v, *args, **kwargs):
        if self.prefill_mean and self.mu is None:
            self.mu = k.float().mean(dim=2, keepdim=True)
        n = max(0, min(self.num_sink - self.seen, k.shape[2]))  # leading tokens kept exact
        self.seen += k.shape[2]
        kq = ref_fake_quant(k[:, :, n:], self.method, self.mu, is_key=True)
        vq = ref_fake_quant(v[:, :, n:], self.method, is_key=False)
        k, v = torch.cat([k[:, :, :n], kq], dim=2), torch.cat([v[:, :, :n], vq], dim=2)
        return super().update(k, v)


def ref_cache(model, name, k_means=None, prefill_mean=False, num_sink=0):
    num_layers, _, head_dim = attention_shape(model.config)
    m = parse_method(name, head_dim)
    mus = [None if k_means is None else k_means[i] for i in range(num_layers)]
    return Cache(layers=[RefLayer(m, mus[i], prefill_mean, num_sink) for i in range(num_layers)])


def run_chunks(model, ids, cache, chunks):
    """Feed ``ids [B, S]`` in chunks (prefill, then shorter steps); return the last logits."""
    logits, start = [], 0
    with torch.no_grad():
        for n in chunks:
            out = model(ids[:, start : start + n], **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits)
            start += n
    return torch.cat(logits, dim=1)


def rand_means(model, scale=1.0):
    torch.manual_seed(3)
    return scale * torch.randn(attention_shape(model.config))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("model_name", ["llama64", "qwen128"])
def test_logits_match_reference(name, model_name, request):
    model = request.getfixturevalue(model_name)
    torch.manual_seed(5)
    ids = torch.randint(0, 256, (2, 40))
    mu = rand_means(model)
    chunks = [24, 1, 1, 14]  # prefill, two decode steps, a chunked-prefill extend
    got = run_chunks(model, ids, SawKVCache(model, name, k_means=mu), chunks)
    want = run_chunks(model, ids, ref_cache(model, name, mu), chunks)
    exact = run_chunks(model, ids, DynamicCache(), chunks)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if name != "auto":  # the check above is sharp: quantization moves logits far more than ATOL
        assert (got - exact).abs().max() > 10 * ATOL
    else:
        torch.testing.assert_close(got, exact, atol=0, rtol=0)


def test_prefill_mean_mode_matches_reference(qwen128):
    torch.manual_seed(6)
    ids = torch.randint(0, 256, (2, 32))
    chunks = [20, 1, 11]
    got = run_chunks(qwen128, ids, SawKVCache(qwen128, "int4-bdr-kc", kc_mode="prefill"), chunks)
    want = run_chunks(qwen128, ids, ref_cache(qwen128, "int4-bdr-kc", prefill_mean=True), chunks)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_centering_shrinks_key_error_on_offset_keys(qwen128):
    """Keys with big constant offsets (qkv bias): centering on their mean cuts the INT4 key error
    several-fold; without calibrated means the cache warns and behaves as mu = 0."""
    torch.manual_seed(7)
    ids = torch.randint(0, 256, (1, 48))
    exact = DynamicCache()
    run_chunks(qwen128, ids, exact, [48])
    mu = torch.stack([layer.keys[0].mean(dim=1) for layer in exact.layers])  # [L, H, D]
    with pytest.warns(UserWarning, match="no calibrated key means"):
        plain = SawKVCache(qwen128, "int4-bdr-kc")
    centered = SawKVCache(qwen128, "int4-bdr-kc", k_means=mu)
    for c in (plain, centered):  # feed the exact keys so both quantize the same tensors
        for i, layer in enumerate(exact.layers):
            c.update(layer.keys, layer.values, i)
    for i, layer in enumerate(exact.layers):
        err = [
            (c.layers[i]._decode(torch.float32)[0] - layer.keys).abs().mean()
            for c in (plain, centered)
        ]
        assert err[1] < 0.5 * err[0]


@pytest.mark.parametrize("chunks", [[24, 1, 15], [2, 1, 1, 36]])  # sinks in one or several steps
def test_sink_tokens_kept_exact(qwen128, chunks):
    torch.manual_seed(8)
    ids = torch.randint(0, 256, (2, 40))
    mu = rand_means(qwen128)
    cache = SawKVCache(qwen128, "int4-bdr-kc", k_means=mu, num_sink=4)
    got = run_chunks(qwen128, ids, cache, chunks)
    want = run_chunks(qwen128, ids, ref_cache(qwen128, "int4-bdr-kc", mu, num_sink=4), chunks)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    plain = run_chunks(qwen128, ids, SawKVCache(qwen128, "int4-bdr-kc", k_means=mu), chunks)
    assert (got - plain).abs().max() > 10 * ATOL
    num_layers, num_kv_heads, head_dim = attention_shape(qwen128.config)
    vectors = num_layers * 2 * 2 * num_kv_heads  # layers x (K, V) x batch x heads
    assert cache.kv_bytes() == vectors * (4 * head_dim * 4 + 36 * (head_dim // 2 + 4))
    cache.crop(-37)  # back to 3 tokens: inside the sinks
    assert cache.get_seq_length() == 3 and cache.layers[0]._k.data.shape[1] == 0


@pytest.mark.parametrize(("model_name", "ratio"), [("llama64", 128 / 36), ("qwen128", 256 / 68)])
def test_int4_stores_the_bytes_its_layout_implies(model_name, ratio, request):
    model = request.getfixturevalue(model_name)
    num_layers, num_kv_heads, head_dim = attention_shape(model.config)
    ids = torch.randint(0, 256, (2, 33))
    caches = {n: SawKVCache(model, n) for n in ("bf16", "int4-bdr", "int8", "int4-bdr-kh")}
    for c in caches.values():
        run_chunks(model, ids, c, [30, 3])
    elems = num_layers * 2 * ids.numel() * num_kv_heads  # vectors stored (K and V)
    assert caches["int4-bdr"].kv_bytes() == elems * (head_dim // 2 + 4)  # codes + fp16 pair
    assert caches["int8"].kv_bytes() == elems * (head_dim + 4)
    # -kh: two fp16 pairs per key, one per value
    assert caches["int4-bdr-kh"].kv_bytes() == elems * (head_dim // 2 + 6)
    kh = caches["int4-bdr-kh"]
    assert kh.bits_per_element() == pytest.approx(4 + 48 / head_dim)
    assert kh.bits_per_element() == pytest.approx(kh.method.bits_per_element(head_dim))
    assert tuple(kh.layers[0]._k.meta.shape) == (2, 33, num_kv_heads, 2, 2)
    assert caches["bf16"].kv_bytes() == elems * head_dim * 2
    got = caches["bf16"].kv_bytes() / caches["int4-bdr"].kv_bytes()
    assert got == pytest.approx(ratio)  # 3.56x at d=64, 3.76x at d=128
    layer = caches["int4-bdr"].layers[0]
    assert layer._k.data.dtype == torch.uint8
    assert tuple(layer._k.data.shape) == (2, 33, num_kv_heads, head_dim // 2)
    assert tuple(layer._k.meta.shape) == (2, 33, num_kv_heads, 1, 2)
    assert caches["int4-bdr"].bits_per_element() == pytest.approx(4 + 32 / head_dim)


def test_greedy_generate_through_cache(llama64):
    ids = torch.randint(0, 256, (1, 12))
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = llama64.generate(ids, **gen)
        same = llama64.generate(ids, **cache_kwargs(llama64, SawKVCache(llama64, "auto")), **gen)
        cache = SawKVCache(llama64, "int4-bdr64")
        q = llama64.generate(ids, **cache_kwargs(llama64, cache), **gen)
        ref = llama64.generate(
            ids, **cache_kwargs(llama64, ref_cache(llama64, "int4-bdr64")), **gen
        )
    assert torch.equal(plain, same)
    assert torch.equal(q, ref) and q.shape == (1, 20)
    assert cache.get_seq_length() == 19  # the last generated token is never fed back


def test_crop_and_batch_select(llama64):
    ids = torch.randint(0, 256, (3, 20))
    full = SawKVCache(llama64, "int4-bdr64")
    run_chunks(llama64, ids, full, [20])
    full.crop(-5)
    assert full.get_seq_length() == 15
    short = SawKVCache(llama64, "int4-bdr64")
    run_chunks(llama64, ids[:, :15], short, [15])
    assert torch.equal(full.layers[1]._k.data, short.layers[1]._k.data)
    full.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(full.layers[0]._v.data, short.layers[0]._v.data[[2, 0]])
    full.reset()
    assert full.get_seq_length() == 0 and full.kv_bytes() == 0


def test_bad_inputs(llama64):
    with pytest.raises(ValueError, match="Hadamard block 128"):
        SawKVCache(llama64, "int4-bdr128")
    with pytest.raises(ValueError, match="k_means has shape"):
        SawKVCache(llama64, "int4-bdr-kc", k_means=torch.zeros(2, 2, 32))
    with pytest.raises(ValueError, match="kc_mode"):
        SawKVCache(llama64, "int4-bdr-kc", kc_mode="dynamic")


def test_cache_kwargs_fills_the_cache_without_deprecation_warning(llama64):
    """transformers 5.23 renamed ``past_key_values`` to ``cache`` (the old name raises a
    FutureWarning); 5.17 takes only ``past_key_values`` and would drop ``cache``. Either way the
    cache must fill, without the warning."""
    import warnings

    cache = SawKVCache(llama64, "int4-bdr64")
    ids = torch.arange(1, 9)[None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llama64(ids, **cache_kwargs(llama64, cache), use_cache=True)
    assert cache.get_seq_length() == 8
    assert not [w for w in caught if "past_key_values" in str(w.message)]
