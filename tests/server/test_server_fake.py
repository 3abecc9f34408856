"""Server behaviour over real HTTP (uvicorn + openai client) with a model-free fake engine.

Fast (seconds): checks the protocol, streaming, errors, admission control and abort-on-disconnect
independently of the model; tests/server/test_openai_server.py repeats the key ones on SmolLM2.
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

from .fake_engine import FakeEngine  # noqa: E402
from .server_thread import ServerThread  # noqa: E402

API_KEY = "test-key"


def expected_ids(prompt: list[int], n: int, vocab: int = 1000) -> list[int]:
    return [(prompt[-1] + i) % vocab for i in range(1, n + 1)]


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine(step_s=0.01)  # 60 tokens take >= 0.6 s: time to see them in flight
    app = build_app(AsyncEngine(engine, max_queue=100), api_key=API_KEY)
    with ServerThread(app) as s:
        s.engine = engine
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


def metrics(server) -> dict[str, float]:
    return parse_metrics(httpx.get(server.url + "/metrics").text)


def test_completion_non_streaming(client):
    r = client.completions.create(
        model="fake-model", prompt=[5, 6, 7], max_tokens=5, extra_body={"return_token_ids": True}
    )
    assert r.choices[0].model_extra["token_ids"] == expected_ids([5, 6, 7], 5)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 5, 8)


def test_completion_stop_token(client):
    r = client.completions.create(
        model="fake-model", prompt=[5], max_tokens=10, extra_body={"stop_token_ids": [8]}
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 3


def test_streaming_usage_and_ids(client):
    chunks = list(
        client.completions.create(
            model="fake-model",
            prompt=[1, 2],
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"return_token_ids": True},
        )
    )
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    assert ids == expected_ids([1, 2], 7)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7


def test_64_concurrent_streams(server):
    async def one(client, i):
        stream = await client.completions.create(
            model="fake-model",
            prompt=[i + 1],
            max_tokens=3 + i % 5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"return_token_ids": True},
        )
        ids, usage = [], None
        async for c in stream:
            if c.choices:
                ids += c.choices[0].model_extra["token_ids"]
            usage = c.usage or usage
        return ids, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    for i, (ids, usage) in enumerate(asyncio.run(main())):
        assert ids == expected_ids([i + 1], 3 + i % 5)
        assert usage.completion_tokens == len(ids)


def test_prompt_too_long(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="fake-model", prompt=list(range(70)), max_tokens=2)
    assert e.value.status_code == 400
    message = e.value.body["message"]
    assert "64" in message and "70" in message
    assert e.value.body["param"] == "prompt"


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"extra_body": {"top_k": -3}}, "top_k"),
        ({"prompt": [5, 100000]}, "prompt"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_bad_params_400(client, kwargs, param):
    kwargs = {"model": "fake-model", "prompt": [1, 2], "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error"


def test_malformed_body_400(server):
    r = httpx.post(
        server.base_url + "/completions",
        json={"max_tokens": 2},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "prompt" in r.json()["error"]["message"]


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=[1], max_tokens=1)


def test_api_key(server):
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    assert httpx.get(server.base_url + "/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["fake-model"]


def test_disconnect_aborts_and_frees_blocks(server):
    before = metrics(server)
    with httpx.stream(
        "POST",
        server.base_url + "/completions",
        json={"model": "fake-model", "prompt": [1], "max_tokens": 60, "stream": True},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert metrics(server)["sawkv_kv_blocks_used"] > 0
    deadline = time.monotonic() + 5
    while (m := metrics(server))["sawkv_kv_blocks_used"] > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert m["sawkv_kv_blocks_used"] == 0
    assert m["sawkv_num_requests_running"] == 0 and m["sawkv_num_requests_in_flight"] == 0
    assert server.engine.aborted, "the request was not aborted"
    assert m["sawkv_generation_tokens_total"] - before["sawkv_generation_tokens_total"] < 60


def test_queue_full_429():
    engine = FakeEngine(step_s=0.01)
    app = build_app(AsyncEngine(engine, max_queue=1))
    with ServerThread(app) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0)
        stream = client.completions.create(
            model="fake-model", prompt=[1], max_tokens=50, stream=True
        )
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="fake-model", prompt=[1], max_tokens=1)
        assert e.value.status_code == 429
        stream.close()
        deadline = time.monotonic() + 5
        while engine.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        r = client.completions.create(model="fake-model", prompt=[1], max_tokens=1)
        assert r.usage.completion_tokens == 1


def test_step_failure_fails_requests_and_server_recovers(client, server):
    server.engine.fail_next_step = True
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="fake-model", prompt=[3], max_tokens=3)
    assert "injected step failure" in e.value.body["message"]
    assert not server.engine.requests  # the failed request was aborted
    r = client.completions.create(model="fake-model", prompt=[3], max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_non_streaming_disconnect_aborts(server):
    body = {"model": "fake-model", "prompt": [7], "max_tokens": 60}  # >= 0.6 s of steps
    headers = {"Authorization": f"Bearer {API_KEY}"}
    num_aborted = len(server.engine.aborted)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/completions", json=body, headers=headers, timeout=0.2)
    deadline = time.monotonic() + 5
    while len(server.engine.aborted) == num_aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(server.engine.aborted) == num_aborted + 1
    assert not server.engine.requests
