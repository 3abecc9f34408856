"""Property-based fuzz of request bodies over real HTTP: no body may earn a 5xx.

Bodies mix well-formed OpenAI fields with random types, out-of-range and non-finite numbers,
arbitrary Unicode (lone surrogates included, sent as JSON escapes), missing and extra fields.
The engine is ``FakeEngine`` with the real SmolLM2 tokenizer and chat template, so everything
before the model runs for real. Afterwards the server must be healthy with nothing in flight.
Bounded to ~300 bodies (well under a minute on two cores).
"""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sawkv.server.api_server import build_app  # noqa: E402
from sawkv.server.async_engine import AsyncEngine  # noqa: E402
from sawkv.server.metrics import parse_metrics  # noqa: E402

from .fake_engine import FakeEngine  # noqa: E402
from .server_thread import ServerThread  # noqa: E402

MAX_MODEL_LEN = 128

# Any text: surrogates (category Cs) included, as the JSON escapes a client can send.
text = st.text(st.characters(codec=None), max_size=40)
huge_ints = st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30])
numbers = st.one_of(
    st.integers(-5, 300),
    huge_ints,
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=8,
)
token_ids = st.lists(st.one_of(st.integers(-2, 49160), huge_ints), min_size=0, max_size=20)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), text),
        "content": st.one_of(
            text,
            st.none(),
            st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["text", "image_url"])}, optional={"text": text}
                ),
                max_size=3,
            ),
            anything,
        ),
        "name": anything,
    },
)
# Plausible values of the fields both endpoints share (OpenAI names and vLLM extensions).
plausible = {
    "model": st.just("fake-model"),
    "max_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(0, 2**63 - 1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.one_of(text.filter(bool), st.lists(text.filter(bool), max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3),
    "ignore_eos": st.booleans(),
    "return_token_ids": st.booleans(),
}
prompts = st.one_of(text.filter(bool), st.lists(st.integers(0, 49151), min_size=1, max_size=20))
valid_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": text}
    ),
    min_size=1,
    max_size=3,
)
valid_completion = st.fixed_dictionaries({"prompt": prompts}, optional=plausible)
valid_chat = st.fixed_dictionaries({"messages": valid_messages}, optional=plausible)
field_names = st.one_of(
    st.sampled_from(
        sorted(plausible)
        + ["prompt", "messages", "n", "echo", "logprobs", "logit_bias", "response_format",
           "tools", "tool_choice", "functions", "presence_penalty", "max_completion_tokens"]
    ),
    text,
)  # fmt: skip
garbage = st.one_of(anything, numbers, token_ids, st.lists(message, max_size=3))


@st.composite
def perturbed(draw, valid):
    """A valid body with one to three fields replaced, removed or added at random."""
    body = dict(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(field_names)
        if name in body and draw(st.booleans()):
            del body[name]
        else:
            body[name] = draw(garbage)
    return body


requests = st.one_of(
    st.tuples(st.just("/v1/completions"), valid_completion),
    st.tuples(st.just("/v1/chat/completions"), valid_chat),
    st.tuples(st.just("/v1/completions"), perturbed(valid_completion)),
    st.tuples(st.just("/v1/chat/completions"), perturbed(valid_chat)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), anything),
)


@pytest.fixture(scope="module")
def server(smollm2_tokenizer):
    engine = FakeEngine(
        max_model_len=MAX_MODEL_LEN,
        vocab_size=len(smollm2_tokenizer),
        tokenizer=smollm2_tokenizer,
        step_s=0.0005,
    )
    with ServerThread(build_app(AsyncEngine(engine), api_key="k")) as s:
        yield s


def test_fuzzed_bodies_never_get_a_5xx(server):
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": "Bearer k"}) as c:

        @settings(
            max_examples=300,
            deadline=None,
            derandomize=True,  # CI sees the same bodies every run
            suppress_health_check=list(HealthCheck),
        )
        @given(requests)
        def check(request):
            path, body = request
            # json.dumps writes NaN/Infinity and \\udxxx escapes, as a sloppy client would
            r = c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (body, r.text)
            if r.status_code >= 400 and "text/event-stream" not in r.headers["content-type"]:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

        check()
    print("status counts:", statuses)
    # both sides of the validation were exercised
    assert statuses.get(200, 0) >= 50 and sum(v for k, v in statuses.items() if k >= 400) >= 50
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = parse_metrics(httpx.get(server.url + "/metrics").text)
        if m["sawkv_num_requests_in_flight"] == 0 and m["sawkv_kv_blocks_used"] == 0:
            break
        time.sleep(0.05)
    assert m["sawkv_num_requests_in_flight"] == 0 and m["sawkv_kv_blocks_used"] == 0
