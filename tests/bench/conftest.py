"""A real ``sawkv serve smollm2-135m`` process on CPU, shared by the HTTP benchmark tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

KV_CACHE_DTYPE = "int4-bdr64"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory):
    """Base URL (``.../v1``) of a real server process on a free port; killed after the module."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from sawkv.models.hub import ModelNotInstalledError, resolve_model_dir

    try:
        resolve_model_dir("smollm2-135m")
    except ModelNotInstalledError as e:
        pytest.skip(f"SmolLM2-135M not installed: {e}")
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    cmd = [sys.executable, "-c", "from sawkv.cli import main; main()", "serve", "smollm2-135m",
           "--port", str(port), "--kv-cache-dtype", KV_CACHE_DTYPE, "--max-model-len", "256",
           "--log-level", "warning"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sawkv serve exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
            try:
                if _get(f"http://127.0.0.1:{port}/health"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"sawkv serve not healthy after 180 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def metric(base_url: str, name: str) -> float:
    """The value of a Prometheus series of the server's ``/metrics`` (first match)."""
    root = base_url.removesuffix("/v1")
    for line in _get(root + "/metrics").splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
