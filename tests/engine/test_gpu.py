"""GPU path of the engine (skipped without CUDA): Triton backend vs the torch reference backend,
and CUDA-graph decode vs eager decode, on small random models with kernel-supported head_dim."""

from __future__ import annotations

import os

import pytest
import torch

from sawkv import LLM, SamplingParams
from sawkv.engine.scheduler import ScheduledBatch
from sawkv.engine.sequence import Sequence

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def model_dir(tiny_qwen3):
    return tiny_qwen3(hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                      head_dim=128, vocab_size=1000, max_position_embeddings=4096)  # fmt: skip


def make(model_dir, kv, **kw):
    return LLM(model_dir, kv, load_format="dummy", dtype="bfloat16", num_gpu_blocks=256,
               max_model_len=2048, **kw)  # fmt: skip


def logprobs(llm, ids):
    eng = llm.engine
    seq = Sequence("s", ids, SamplingParams())
    assert eng.block_manager.ensure_slots(seq, len(ids))
    with torch.inference_mode():
        inp, pos, ctx, _, _ = eng.runner.prepare(ScheduledBatch([seq], [len(ids)]))
        out = eng.runner.model.compute_logits(eng.runner.model(inp, pos, ctx))
    eng.block_manager.free(seq)
    return out.log_softmax(-1)


@pytest.mark.parametrize(
    "kv", ["bf16", "int8", "int4", "int4-bdr128", "int4-bdr64-kv", "int4-bdr128-kv-kh"]
)
def test_triton_backend_matches_torch(model_dir, kv):
    ids = torch.randint(0, 1000, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = logprobs(make(model_dir, kv, attention_backend="torch", enforce_eager=True), ids)
    got = logprobs(make(model_dir, kv, attention_backend="triton", enforce_eager=True), ids)
    kl = (ref.exp() * (ref - got)).sum(-1)
    assert kl.max() < 2e-2 and kl.mean() < 2e-3, (kl.max(), kl.mean())


@pytest.mark.parametrize("kv", ["bf16", "int4-bdr128"])
def test_cuda_graph_decode_matches_eager(model_dir, kv):
    # synchronous: the test schedules and plans a step by hand after eng.step(), which async
    # scheduling would leave with a step in flight
    llm = make(model_dir, kv, max_num_seqs=8, async_scheduling=False)
    eng = llm.engine
    assert eng.runner.graphs is not None
    g = torch.Generator().manual_seed(1)
    for i, n in enumerate((5, 300, 37)):
        params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
        eng.add_request(f"r{i}", torch.randint(0, 1000, (n,), generator=g).tolist(), params)
    for _ in range(3):
        eng.step()  # prefill, then decode steps
    batch = eng.scheduler.schedule()
    assert batch.is_decode and len(batch) == 3
    runner = eng.runner
    with torch.inference_mode():
        # one planned step, run both ways (the eager run rewrites the same slots, same K/V)
        step = runner.upload(runner.plan(batch))
        hidden = runner.graphs.run(step.input_ids, step.positions, step.ctx)
        graph_logits = runner.model.compute_logits(hidden).clone()
        eager = runner.model(step.input_ids, step.positions, step.ctx)
        eager_logits = runner.model.compute_logits(eager)
    torch.testing.assert_close(graph_logits, eager_logits, atol=2e-2, rtol=2e-2)


def test_generate_on_gpu_runs_all_methods(model_dir):
    prompts = [[1, 2, 3] * k for k in (1, 10, 50)]
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=20, ignore_eos=True)
    for kv in ("auto", "int4-bdr128-kc"):
        outs = make(model_dir, kv).generate(prompts, params, use_tqdm=False)
        assert [len(o.token_ids) for o in outs] == [20, 20, 20]


@pytest.mark.parametrize("kv", ["bf16", "int4-bdr128"])
def test_mixed_step_triton_matches_torch(model_dir, kv):
    """Decoding sequences + a prefill chunk in one step: decode and extend kernels on
    sub-contexts, against the torch reference backend."""
    logits = []
    for backend in ("torch", "triton"):
        eng = make(
            model_dir, kv, attention_backend=backend, enforce_eager=True, async_scheduling=False
        ).engine  # a step is scheduled by hand below
        params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
        eng.add_request("a", list(range(1, 40)), params)
        eng.add_request("b", list(range(5, 300)), params)
        eng.step()
        eng.add_request("c", list(range(7, 500)), params)
        batch = eng.scheduler.schedule()
        assert batch.num_new_tokens[:2] == [1, 1] and batch.num_new_tokens[2] > 1
        with torch.inference_mode():
            out, idx = eng.runner.run(batch)
        logits.append(out.log_softmax(-1))
    kl = (logits[0].exp() * (logits[0] - logits[1])).sum(-1)
    assert kl.max() < 2e-2, kl


def test_shutdown_frees_memory_for_the_next_engine(model_dir):
    """Two engines in one process (a benchmark over methods): after ``shutdown`` the second one
    profiles and sizes its cache without counting the first one's pages and graphs."""
    from sawkv.engine.llm_engine import LLMEngine

    def build():
        return LLMEngine.from_args(model_dir, "int4-bdr128", load_format="dummy",
                                   dtype="bfloat16", max_model_len=2048,
                                   gpu_memory_utilization=0.5)  # fmt: skip

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    first = build()
    n_first = first.runner.num_blocks
    first.add_request("r", [1, 2, 3], SamplingParams(max_tokens=4))
    first.shutdown()
    first.shutdown()  # idempotent
    assert not first.has_unfinished_requests()
    assert torch.cuda.memory_allocated() - base < 64 * 2**20
    second = build()
    assert second.runner.num_blocks >= 0.99 * n_first
    second.shutdown()


@pytest.mark.parametrize("bits, had, rot_v, window", [(4, 128, True, 0), (4, 128, False, 0),
                         (8, 0, False, 0), (16, 0, False, 0), (4, 128, False, 200)])  # fmt: skip
def test_varlen_extend_matches_reference(bits, had, rot_v, window):
    """The prefill path for many sequences at once (one varlen FlashAttention call over the
    dequantized pages) against the fp32 torch reference on the same pages: mixed lengths, chunks
    shorter than the context (bottom-right causal alignment), GQA 4, a sliding window."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))
    from paged_setup import paged_case

    from sawkv.attention.reference import paged_attention_extend_ref
    from sawkv.kernels import dequant, paged_attention_extend

    lens, q_lens = [300, 17, 1000, 64, 129], [300, 5, 250, 1, 64]
    pages, tables, seq_lens, fmt = paged_case(
        lens, head_dim=128, num_kv_heads=2, block_size=16, bits=bits, had_block=had,
        rotate_v=rot_v, dtype=torch.bfloat16, seed=5,
    )  # fmt: skip
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), 8, 128).bfloat16()
    kw = dict(scale=128**-0.5, sliding_window=window)
    ref = paged_attention_extend_ref(q, pages, tables, seq_lens, qsl, fmt, **kw)
    cuda = type(pages)(*(None if t is None else t.cuda() for t in pages))
    out = torch.full_like(q, float("nan")).cuda()
    paged_attention_extend(q.cuda(), cuda, tables.cuda(), seq_lens.cuda(), qsl.cuda(), fmt,
                           out=out, impl="sdpa", **kw)  # fmt: skip
    key = f"{out.device}/{'window' if window else 'full'}"
    assert dequant._VARLEN_OK.get(key) is True, "varlen FlashAttention did not run"
    err = (out.float().cpu() - ref.float()).norm() / ref.float().norm()
    assert err < 5e-3, err


@pytest.mark.parametrize("bits,num_q_heads", [(4, 8), (8, 8), (4, 24), (8, 24)])
def test_k_half_meta_decode_takes_the_cuda_kernel(bits, num_q_heads):
    """Pages with per-half key metadata on the GPU: the decode plan takes the CUDA kernel where
    it builds (one or two query tiles: G = 4 and 12), matches the fp32 reference, and agrees
    with the Triton kernel on the same pages. The keys' halves get very different scales, so a
    kernel that used one half's (scale, min) for the whole key would fail."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))
    from paged_setup import paged_case

    from sawkv.attention.reference import paged_attention_decode_ref
    from sawkv.kernels import decode_cuda, paged_attention_decode, plan_decode
    from sawkv.kernels.launch import KernelConfig

    lens = [1000, 3, 4100, 17]
    pages, tables, seq_lens, fmt = paged_case(
        lens, head_dim=128, num_kv_heads=2, block_size=16, bits=bits, had_block=128,
        rotate_v=True, dtype=torch.bfloat16, seed=9, k_half=True,
    )  # fmt: skip
    # second half of each key 8x the scale of the first: the two (scale, min) pairs differ
    k_meta = pages.k_meta.clone()
    k_meta[..., 2:] *= 8
    pages = pages._replace(k_meta=k_meta)
    q = torch.randn(len(lens), num_q_heads, 128).bfloat16()
    ref = paged_attention_decode_ref(q, pages, tables, seq_lens, fmt, scale=128**-0.5).float()
    dev = [t.cuda() for t in (q, tables, seq_lens)]
    cuda = type(pages)(*(None if t is None else t.cuda() for t in pages))
    plan = plan_decode(dev[0], dev[1], dev[2], fmt)
    if decode_cuda.available(dev[0].device) and os.environ.get("TRITON_INTERPRET") != "1":
        assert plan.impl == "cuda"
    tri = plan_decode(dev[0], dev[1], dev[2], fmt, config=KernelConfig(impl="triton"))
    assert tri.impl == "triton"
    for p in (plan, tri):
        out = paged_attention_decode(dev[0], cuda, dev[1], dev[2], fmt, scale=128**-0.5, plan=p)
        # fp16 products (q and p * scale_v rounded, ~5e-4 each) and a bf16 output
        err = (out.float().cpu() - ref).norm() / ref.norm()
        assert err < 1e-2, (p.impl, err)


@pytest.mark.parametrize("kv", ["bf16", "int4-bdr128"])
def test_async_scheduling_matches_sync_on_gpu(model_dir, kv):
    """CUDA graphs, pinned read-back and device-fed placeholders: the same greedy tokens as the
    synchronous engine (the batches are the same step for step: no stop depends on a value)."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (7, 300, 40, 129)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = []
    for async_scheduling in (False, True):
        llm = make(model_dir, kv, max_num_seqs=8, async_scheduling=async_scheduling)
        outs.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        llm.engine.shutdown()
    assert outs[0] == outs[1]


SINK_CASES = [(4, 128, False, 0, 0), (4, 128, True, 0, 4), (8, 0, False, 0, 1),
              (4, 128, False, 300, 0)]  # fmt: skip


@pytest.mark.parametrize("bits, had, rot_v, window, splits", SINK_CASES)
def test_cuda_decode_with_sinks_matches_reference(bits, had, rot_v, window, splits):
    """The CUDA decode kernel attending from num_sink on (log-sum-exp out, sinks merged in
    torch) against the fp32 reference that reads the exact sinks in place of the pages'."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))
    from test_sinks import _case

    from sawkv.attention.reference import paged_attention_decode_ref
    from sawkv.kernels import decode_cuda, paged_attention_decode, plan_decode
    from sawkv.kernels.launch import KernelConfig
    from sawkv.kernels.sinks import SinkKV

    if not decode_cuda.available(torch.device("cuda")) or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the CUDA decode kernel is off (SAWKV_CUDA_DECODE=0) or did not build")

    lens = [1000, 3, 4100, 17, 1]
    pages, tables, seq_lens, fmt, sinks = _case(
        lens, d=128, h=2, bits=bits, had=had, rot_v=rot_v, dtype=torch.bfloat16, seed=7
    )
    q = torch.randn(len(lens), 8, 128).bfloat16()
    kw = dict(scale=128**-0.5, sliding_window=window)
    ref = paged_attention_decode_ref(q, pages, tables, seq_lens, fmt, sinks=sinks, **kw).float()
    dev = [t.cuda() for t in (q, tables, seq_lens)]
    cuda = type(pages)(*(None if t is None else t.cuda() for t in pages))
    s_cuda = SinkKV(sinks.k.cuda(), sinks.v.cuda(), sinks.k_mean.cuda())
    plan = plan_decode(dev[0], dev[1], dev[2], fmt, sliding_window=window,
                       config=KernelConfig(num_splits=splits))  # fmt: skip
    assert plan.impl == "cuda"
    out = paged_attention_decode(*dev[:1], cuda, *dev[1:], fmt, plan=plan, sinks=s_cuda, **kw)
    err = (out.float().cpu() - ref).norm() / ref.norm()
    assert err < 5e-3, err


def test_engine_with_sinks_matches_torch_backend(model_dir, monkeypatch):
    """A recipe with sinks through the Triton/CUDA backend against the torch backend: close
    prefill scores and the same greedy tokens (eager: CUDA graphs plan other split counts, and
    this random model's near-ties flip on rounding); then one decode step with sinks replayed
    as a CUDA graph against the same step run eagerly. (Dummy weights have no stored recipe:
    the test hands the engine one.)"""
    from sawkv.quant import parse_method
    from sawkv.quant.recipe import Recipe

    layers = tuple(parse_method(n, 128) for n in ("int4-bdr128", "int8-bdr64"))
    recipe = Recipe(layers, 128, 2, num_sink=4)
    monkeypatch.setattr("sawkv.engine.llm_engine.resolve_kv_method", lambda *a: recipe)
    ids = torch.randint(0, 1000, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    fast = make(model_dir, "saw-int4", enforce_eager=True)
    ref = make(model_dir, "saw-int4", attention_backend="torch", enforce_eager=True)
    assert fast.engine.runner.kv[0].sinks is not None
    a, b = logprobs(fast, ids), logprobs(ref, ids)
    assert (a.exp() * (a - b)).sum(-1).mean().item() < 1e-2
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[5, 6, 7], ids[:50], ids[:300]]  # the first one writes sinks in decode steps
    got = [o.token_ids for o in fast.generate(prompts, params, use_tqdm=False)]
    assert got == [o.token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    del fast, ref
    eng = make(model_dir, "saw-int4", max_num_seqs=8, async_scheduling=False).engine
    assert eng.runner.graphs is not None
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        eng.step()  # prefill, then decode steps: the short prompt's sinks are all written
    batch = eng.scheduler.schedule()
    runner = eng.runner
    with torch.inference_mode():
        step = runner.upload(runner.plan(batch))
        assert step.ctx.is_decode and step.ctx.sink_dst is None
        graph = runner.model.compute_logits(runner.graphs.run(step.input_ids, step.positions,
                                                              step.ctx)).clone()  # fmt: skip
        eager = runner.model.compute_logits(runner.model(step.input_ids, step.positions, step.ctx))
    torch.testing.assert_close(graph, eager, atol=2e-2, rtol=2e-2)
