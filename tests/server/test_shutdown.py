"""Shutdown drain: after SIGTERM, requests in flight get ``drain_timeout_s`` and then end with
an error (an in-band error chunk for streams), and the process exits.

The first test drives the drain in-process (FakeEngine, a flag in place of uvicorn's exit
flag); the second sends a real SIGTERM to ``sawkv serve`` on SmolLM2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sawkv.server.api_server import build_app  # noqa: E402
from sawkv.server.async_engine import AsyncEngine  # noqa: E402
from sawkv.server.metrics import parse_metrics  # noqa: E402

from .fake_engine import FakeEngine  # noqa: E402
from .server_thread import ServerThread  # noqa: E402

LONG = {"prompt": [1, 2, 3], "max_tokens": 5000, "stream": True}  # ~50 s at 10 ms a step


def read_events(lines) -> list:
    """SSE ``data:`` payloads from an iterator of lines, as parsed JSON ('[DONE]' as is)."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_drain_timeout_ends_streams_with_an_error_chunk():
    engine = FakeEngine(max_model_len=10_000, step_s=0.01)
    shutting_down = threading.Event()
    app = build_app(AsyncEngine(engine), is_shutting_down=shutting_down.is_set, drain_timeout_s=1.0)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        short = c.post("/v1/completions", json={"prompt": [1], "max_tokens": 5})
        assert short.status_code == 200  # before shutdown, requests finish normally
        with c.stream("POST", "/v1/completions", json=LONG) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            shutting_down.set()
            t0 = time.monotonic()
            rest = []
            for line in lines:
                if line.startswith("data: "):
                    rest.append(line[len("data: ") :])
            elapsed = time.monotonic() - t0
        assert 0.9 <= elapsed < 5.0  # the drain timeout, not the 50 s the request wanted
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert "drain timeout" in error["message"] and error["type"] == "server_error"
        r = c.post("/v1/completions", json={"prompt": [1], "max_tokens": 5})
        assert r.status_code == 503  # new work is refused while shutting down
        deadline = time.monotonic() + 5
        while parse_metrics(c.get("/metrics").text)["sawkv_kv_blocks_used"] and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert parse_metrics(c.get("/metrics").text)["sawkv_kv_blocks_used"] == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_sigterm_drains_then_exits(smollm2_dir):
    port = _free_port()
    # a fixed method: the default (saw-int4) would first calibrate SmolLM2's recipe on a machine
    # that has none, minutes of CPU before the server is healthy; this test is about the drain
    cmd = [
        sys.executable, "-m", "sawkv.cli", "serve", "smollm2-135m", "--port", str(port),
        "--kv-cache-dtype", "int4-bdr64", "--max-model-len", "1024", "--drain-timeout", "2",
        "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
            assert proc.poll() is None, proc.stdout.read()
        body = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            events = read_events(lines)
        assert time.monotonic() - t0 < 15
        assert events[-1] == "[DONE]" and "drain timeout" in events[-2]["error"]["message"]
        # uvicorn re-raises the captured SIGTERM once shut down: "killed by SIGTERM" is a clean exit
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        out = proc.stdout.read()
        # the startup line: model, method, bits per element, pool size, context, address
        assert re.search(r"sawkv serving smollm2-135m: kv cache \S+ \([\d.]+ bits/element", out), (
            out
        )
        assert "max_model_len 1024" in out and f"http://127.0.0.1:{port}/v1" in out
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
