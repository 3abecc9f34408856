"""The real server on SmolLM2-135M with an INT4+BDR KV cache, over HTTP with the openai client.

One engine (small page pool) serves the whole module. Token counts are checked through vLLM's
``return_token_ids`` extension: every streamed token arrives once, the text equals a full
decode of those ids, usage agrees, and streaming equals non-streaming under greedy decoding.
"""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from sawkv.server.api_server import build_app  # noqa: E402
from sawkv.server.async_engine import AsyncEngine  # noqa: E402
from sawkv.server.metrics import parse_metrics  # noqa: E402

from .server_thread import ServerThread  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
API_KEY = "sk-test"
MAX_MODEL_LEN = 256
NUM_BLOCKS = 160  # 16-token pages: 64 short requests fit, a long one does not fit twice
GREEDY = {"temperature": 0.0}
IDS = {"return_token_ids": True}


@pytest.fixture(scope="module")
def server(smollm2_dir, request):
    """The real engine behind the HTTP app, synchronous (``request.param`` False) or with async
    scheduling (the GPU default: outputs arrive one step late, stops apply one step late)."""
    from sawkv.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_args(
        MODEL,
        kv_cache_dtype="int4-bdr64",
        max_model_len=MAX_MODEL_LEN,
        num_gpu_blocks=NUM_BLOCKS,
        async_scheduling=request.param,  # every test names its engines (SYNC / BOTH)
    )
    app = build_app(AsyncEngine(engine, max_queue=256), api_key=API_KEY)
    with ServerThread(app) as s:
        s.tokenizer = engine.tokenizer
        yield s


# Tests of what the scheduling mode changes (token delivery, streaming, stops, aborts, load)
# run against both engines; validation and routing run once, against the synchronous one.
BOTH = pytest.mark.parametrize("server", [False, True], ids=["sync", "async"], indirect=True)
SYNC = pytest.mark.parametrize("server", [False], ids=["sync"], indirect=True)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def metrics(server) -> dict[str, float]:
    return parse_metrics(httpx.get(server.url + "/metrics").text)


def wait_idle(server, timeout_s: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = metrics(server)
        if m["sawkv_kv_blocks_used"] == 0 and m["sawkv_num_requests_running"] == 0:
            return m
        time.sleep(0.05)
    return m


@SYNC
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


@BOTH
def test_completion(client, server):
    prompt = "The capital of France is"
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, extra_body={**IDS, "ignore_eos": True}, **GREEDY
    )
    ids = r.choices[0].model_extra["token_ids"]
    assert len(ids) == 8 and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == server.tokenizer.decode(ids, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(server.tokenizer(prompt).input_ids)
    assert r.usage.completion_tokens == 8


@SYNC
def test_chat_uses_chat_template(client, server):
    messages = [{"role": "user", "content": "Name a color."}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, extra_body=IDS, **GREEDY
    )
    expected = server.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert r.usage.prompt_tokens == len(server.tokenizer(expected).input_ids)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    ids = choice.model_extra["token_ids"]
    assert r.usage.completion_tokens == len(ids) <= 6
    assert choice.message.content == server.tokenizer.decode(ids, skip_special_tokens=True)
    assert choice.finish_reason in ("stop", "length")


@BOTH
def test_streaming_equals_non_streaming(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, **GREEDY)
    full = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, extra_body=IDS
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    assert text == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
    assert full.usage.completion_tokens == len(ids)


@SYNC
def test_chat_streaming(client):
    messages = [{"role": "user", "content": "Say hello."}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=8, **GREEDY)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


@BOTH
def test_64_concurrent_streams(server):
    async def one(client, i):
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"Item {i}: the",
            max_tokens=4 + i % 4,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={**IDS, "ignore_eos": True},
        )
        text, ids, usage, reason = "", [], None, None
        async for c in stream:
            if c.choices:
                text += c.choices[0].text
                ids += c.choices[0].model_extra["token_ids"]
                reason = c.choices[0].finish_reason or reason
            usage = c.usage or usage
        return text, ids, usage, reason

    async def main():
        client = openai.AsyncOpenAI(
            base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120
        )
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    before = metrics(server)
    results = asyncio.run(main())
    for i, (text, ids, usage, reason) in enumerate(results):
        assert len(ids) == 4 + i % 4 == usage.completion_tokens
        assert reason == "length"
        assert text == server.tokenizer.decode(ids, skip_special_tokens=True)
    after = wait_idle(server)
    assert after["sawkv_kv_blocks_used"] == 0
    generated = after["sawkv_generation_tokens_total"] - before["sawkv_generation_tokens_total"]
    assert generated == sum(4 + i % 4 for i in range(64))


@SYNC
def test_prompt_too_long_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[42] * 300, max_tokens=4)
    assert e.value.status_code == 400
    assert str(MAX_MODEL_LEN) in e.value.body["message"] and "300" in e.value.body["message"]


@SYNC
@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1.0}, {"top_p": 1.5}, {"max_tokens": 0}, {"n": 2}]
)
def test_bad_params_400(client, kwargs):
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kwargs)
    assert e.value.body["param"] == next(iter(kwargs.keys() - {"model", "messages"}))


@SYNC
def test_wrong_api_key_401(server):
    bad = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="hi", max_tokens=1)


@BOTH
def test_disconnect_aborts_and_frees_pages(server):
    before = wait_idle(server)
    body = {
        "model": MODEL,
        "prompt": "Write a long story about a dragon.",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.base_url + "/completions", json=body, headers=headers) as r:
        lines = (line for line in r.iter_lines() if line)
        next(lines), next(lines)  # two chunks: the request holds pages now
        assert metrics(server)["sawkv_kv_blocks_used"] > 0
    after = wait_idle(server)
    assert after["sawkv_kv_blocks_used"] == 0
    assert after["sawkv_num_requests_in_flight"] == 0
    generated = after["sawkv_generation_tokens_total"] - before["sawkv_generation_tokens_total"]
    assert generated < 200  # aborted, not run to completion


@BOTH
@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cut_and_reported(client, stream):
    kwargs = dict(model=MODEL, prompt="My favourite food is", extra_body={"ignore_eos": True})
    base = client.completions.create(**kwargs, max_tokens=8, **GREEDY).choices[0].text
    stop = base[4:6]  # a stop string that greedy decoding is known to produce
    r = client.completions.create(**kwargs, max_tokens=8, stop=[stop], stream=stream, **GREEDY)
    chunks = list(r) if stream else [r]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == base[: base.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
