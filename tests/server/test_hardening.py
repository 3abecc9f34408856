"""Hostile and careless clients over real HTTP (uvicorn + raw httpx / the openai client).

The engine is the model-free ``FakeEngine`` with the real SmolLM2 tokenizer and chat template,
so tokenization, templating and every API-layer check run for real in seconds. Each test is a
failure found by hand in issue 12: it must now be a 4xx naming the problem, never a 500, a
stall or a reset connection.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from sawkv.server.api_server import build_app  # noqa: E402
from sawkv.server.async_engine import AsyncEngine  # noqa: E402

from .fake_engine import FakeEngine  # noqa: E402
from .server_thread import ServerThread  # noqa: E402

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 256
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def server(smollm2_tokenizer):
    engine = FakeEngine(
        max_model_len=MAX_MODEL_LEN, vocab_size=len(smollm2_tokenizer), tokenizer=smollm2_tokenizer
    )
    app = build_app(AsyncEngine(engine, max_queue=512), api_key=API_KEY)
    with ServerThread(app) as s:
        s.engine = engine
        yield s


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def post(http, path: str, body, headers=AUTH) -> httpx.Response:
    """POST a body as raw JSON text (Python's json allows NaN, Infinity and lone surrogates)."""
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return http.post(path, content=content, headers={**headers, "Content-Type": "application/json"})


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


def assert_healthy(http) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    r = post(http, "/v1/chat/completions", CHAT)
    assert r.status_code == 200, r.text


# ---- huge prompts ---------------------------------------------------------------------------


def _health_latencies(url: str, stop: threading.Event, out: list) -> None:
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            out.append((c.get(url + "/health").status_code, time.monotonic() - t0))
            time.sleep(0.05)


@pytest.mark.parametrize("chunked", [False, True])
def test_50mb_prompt_refused_fast_and_health_answers(server, http, chunked):
    """Issue: 70-97 s to the 400, /health timing out meanwhile. The body limit answers from
    Content-Length; a chunked body is cut as soon as it passes the limit."""
    body = json.dumps({"model": "fake-model", "prompt": "word " * 10_000_000}).encode()
    assert len(body) > 50_000_000
    content = iter([body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)])
    stop, health = threading.Event(), []
    prober = threading.Thread(target=_health_latencies, args=(server.url, stop, health))
    prober.start()
    try:
        t0 = time.monotonic()
        r = http.post(
            "/v1/completions",
            content=content if chunked else body,
            headers={**AUTH, "Content-Type": "application/json"},
        )
        elapsed = time.monotonic() - t0
        time.sleep(0.2)  # a probe or two after the answer
    finally:
        stop.set()
        prober.join()
    assert "at most" in assert_error(r, 413)
    assert elapsed < 5.0
    assert health and all(code == 200 and s < 2.0 for code, s in health), health
    assert_healthy(http)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_text_longer_than_context_refused_before_tokenizing(server, http, path):
    """Under the body limit but more characters than max_model_len tokens can spell: refused
    from the character count (tokenizing 1M characters would take seconds)."""
    text = "x" * 1_000_000
    body = {"model": "fake-model", "prompt": text}
    param = "prompt"
    if path.endswith("chat/completions"):
        body, param = (
            {"model": "fake-model", "messages": [{"role": "user", "content": text}]},
            ("messages"),
        )
    t0 = time.monotonic()
    message = assert_error(post(http, path, body), 400, param)
    assert time.monotonic() - t0 < 2.0
    assert "1000000 characters" in message and str(MAX_MODEL_LEN) in message


# ---- reachable 500s -------------------------------------------------------------------------


def test_lone_surrogate_in_chat_content_is_400_and_connection_survives(http):
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "a\ud800b"}]})
    assert "\\ud800" in body  # sent as the JSON escape, which json.loads turns into U+D800
    message = assert_error(post(http, "/v1/chat/completions", body), 400, "messages.0.content")
    assert "surrogate" in message
    assert_healthy(http)  # same keep-alive connection


@pytest.mark.parametrize("field", ["prompt", "stop", "model"])
def test_lone_surrogate_elsewhere_is_400(http, field):
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 2, field: "\udfff"}
    r = post(http, "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_non_ascii_authorization_is_401_and_connection_survives(http):
    r = http.post(
        "/v1/completions",
        json={"prompt": "hi"},
        headers={"Authorization": "Bearer clé".encode()},
    )
    assert_error(r, 401)
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 200


def test_unicode_api_key_works(smollm2_tokenizer):
    engine = FakeEngine(max_model_len=64, vocab_size=len(smollm2_tokenizer))
    key = "clé-ключ"
    with ServerThread(build_app(AsyncEngine(engine), api_key=key)) as s:
        with httpx.Client(base_url=s.url) as c:
            good = {"Authorization": f"Bearer {key}".encode()}
            body = {"prompt": [1, 2], "max_tokens": 2}
            assert c.post("/v1/completions", json=body, headers=good).status_code == 200
            bad = {"Authorization": "Bearer clé-ключа".encode()}
            assert c.post("/v1/completions", json=body, headers=bad).status_code == 401


# ---- parameter limits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": [1] * 10, "max_tokens": 10**9}, "max_tokens"),
        ("/v1/completions", {"prompt": [1] * 250}, "max_tokens"),  # default 16: 266 > 256
        ("/v1/chat/completions", {**CHAT, "max_tokens": 10**9}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 300}, "max_completion_tokens"),
    ],
)
def test_prompt_plus_max_tokens_over_context_is_400(http, path, body, param):
    message = assert_error(post(http, path, {"model": "fake-model", **body}), 400, param)
    # vLLM's wording: the limit, the total, and its two parts
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in message
    requested = body.get("max_completion_tokens", body.get("max_tokens", 16))
    assert f"{requested} in the completion" in message


def test_max_tokens_that_fits_exactly_is_accepted(http):
    r = post(http, "/v1/completions", {"prompt": [1] * 200, "max_tokens": MAX_MODEL_LEN - 200})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == MAX_MODEL_LEN - 200


@pytest.mark.parametrize(
    "raw_value,param",
    [
        ("Infinity", "temperature"),
        ("-Infinity", "temperature"),
        ("NaN", "temperature"),
        ("1e300", "temperature"),
        ("2.5", "temperature"),
        ("NaN", "top_p"),
        ("1e300", "presence_penalty"),
        (str(2**70), "seed"),
        (str(-(2**70)), "seed"),
        (str(10**30), "top_k"),
        (f"[{2**70}]", "stop_token_ids"),
    ],
)
def test_out_of_range_numbers_are_400(http, raw_value, param):
    body = f'{{"prompt": "hi", "max_tokens": 2, "{param}": {raw_value}}}'
    r = post(http, "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].split(".")[0] == param


def test_largest_seed_is_accepted(http):
    r = post(http, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": 2**63 - 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
    ],
)
def test_unsupported_options_are_refused(client_kwargs, extra, param):
    client = openai.OpenAI(**client_kwargs)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**CHAT, extra_body=extra)
    assert e.value.body["param"] == param


def test_harmless_defaults_of_unsupported_options_pass(http):
    body = {**CHAT, "response_format": {"type": "text"}, "tool_choice": "none", "tools": []}
    assert post(http, "/v1/chat/completions", body).status_code == 200


@pytest.fixture
def client_kwargs(server):
    return {"base_url": server.base_url, "api_key": API_KEY, "max_retries": 0}


@pytest.mark.parametrize("role", ["wizard", "tool", "function", ""])
def test_invalid_role_is_400(http, role):
    body = {**CHAT, "messages": [{"role": role, "content": "hi"}]}
    message = assert_error(post(http, "/v1/chat/completions", body), 400, "messages.0.role")
    assert "user" in message  # names the roles that are accepted


def test_developer_role_reaches_the_template_as_system(http, smollm2_tokenizer):
    msgs = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = post(http, "/v1/chat/completions", {**CHAT, "messages": msgs})
    assert r.status_code == 200, r.text
    as_system = [{"role": "system", "content": "Be brief."}, msgs[1]]
    text = smollm2_tokenizer.apply_chat_template(as_system, add_generation_prompt=True, tokenize=0)
    assert r.json()["usage"]["prompt_tokens"] == len(smollm2_tokenizer(text).input_ids)


@pytest.mark.parametrize("raw", ['{"prompt": "hi",', "{'prompt': 'hi'}", "\xff\xfe", ""])
def test_malformed_json_is_400_without_a_bogus_param(http, raw):
    message = assert_error(post(http, "/v1/completions", raw.encode("latin-1")), 400)
    assert "JSON" in message or "request body" in message
    assert_healthy(http)


def test_malformed_json_names_the_position(http):
    message = assert_error(post(http, "/v1/completions", '{"prompt": "hi",'), 400, None)
    assert message.startswith("the request body is not valid JSON") and "character 16" in message


# ---- docs and key ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_are_closed_when_an_api_key_is_set(http, path):
    assert http.get(path).status_code == 404


def test_docs_are_open_without_a_key():
    with ServerThread(build_app(AsyncEngine(FakeEngine()))) as s:
        assert httpx.get(s.url + "/openapi.json").json()["info"]["title"] == "sawkv"
