"""Load generator for OpenAI-compatible servers: streamed completions over aiohttp.

``num_requests`` prompts are sent to ``POST {base_url}/completions`` with ``stream: true``, at
most ``concurrency`` in flight at a time (a new request starts when one finishes, as
``vllm bench serve --max-concurrency`` does), optionally paced by a Poisson arrival process
(``request_rate`` requests/s; the default sends them all at once). Each request asks for
``output_len`` tokens with ``ignore_eos`` (vLLM, SGLang and sawkv honour it) so every request
generates the same length.
Timing is taken at the client, on the arrival of each SSE chunk that carries tokens.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from collections.abc import Callable

import aiohttp

from sawkv.bench.metrics import SERVER_HISTOGRAMS, RequestResult

_INFO_RE = re.compile(r"^sawkv_engine_info\{(?P<labels>[^}]*)\}", re.MULTILINE)


def _timeout(request_timeout_s: float) -> aiohttp.ClientTimeout:
    # No total limit: under load a 16K-token prompt may wait minutes for its first token.
    return aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=request_timeout_s)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _chunk_tokens(chunk: dict) -> tuple[int, int | None]:
    """(tokens this SSE chunk carries, usage.completion_tokens or None). A chunk with
    ``token_ids`` (vLLM / sawkv extension) counts them; one with text counts as one token."""
    usage = chunk.get("usage") or None
    completion = usage.get("completion_tokens") if usage else None
    choices = chunk.get("choices") or []
    if not choices:
        return 0, completion
    choice = choices[0]
    ids = choice.get("token_ids")
    if ids:
        return len(ids), completion
    text = choice.get("text")
    if text is None:  # chat chunk
        text = (choice.get("delta") or {}).get("content")
    return (1 if text else 0), completion


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict,
    num_input_tokens: int,
    headers: dict[str, str],
) -> RequestResult:
    """POST one streaming completion; never raises for request failures (they land in
    ``RequestResult.error``)."""
    result = RequestResult(num_input_tokens)
    counted, usage_tokens = 0, None
    start = time.perf_counter()
    last = start
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                body = (await resp.text())[:300]
                result.error = f"HTTP {resp.status}: {body}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
                    return result
                n, usage = _chunk_tokens(chunk)
                usage_tokens = usage if usage is not None else usage_tokens
                if n == 0:
                    continue
                now = time.perf_counter()
                if counted == 0:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last, counted = now, counted + n
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency_s = last - start
    result.num_output_tokens = usage_tokens if usage_tokens is not None else counted
    if counted == 0:
        result.error = "the stream carried no tokens"
    return result


def completion_payload(model: str, prompt: list[int], output_len: int, ignore_eos: bool) -> dict:
    """The streamed ``/v1/completions`` body of one request (greedy)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def arrival_times(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send times in seconds from the start: all 0 for an infinite rate, else a Poisson
    process (exponential gaps of mean ``1 / request_rate``), the first request at 0."""
    if request_rate <= 0:
        raise ValueError(f"request_rate must be positive, got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(num_requests):
        times.append(t)
        t += rng.expovariate(request_rate)
    return times


async def run_load(
    base_url: str,
    model: str,
    prompts: list[list[int]],
    output_len: int,
    concurrency: int,
    *,
    request_rate: float = math.inf,
    ignore_eos: bool = True,
    api_key: str | None = None,
    request_timeout_s: float = 3600.0,
    on_done: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Send every prompt, at most ``concurrency`` in flight, request ``i`` no earlier than
    :func:`arrival_times` says. Returns (results in prompt order, wall seconds from the first
    request sent to the last one finished)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    arrivals = arrival_times(len(prompts), request_rate)
    url = base_url.rstrip("/") + "/completions"
    headers = _headers(api_key)
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def one(prompt: list[int], at: float) -> RequestResult:
        if at > 0:
            await asyncio.sleep(at - (time.perf_counter() - start))
        async with gate:
            payload = completion_payload(model, prompt, output_len, ignore_eos)
            result = await send_request(session, url, payload, len(prompt), headers)
        if on_done is not None:
            on_done(result)
        return result

    async with aiohttp.ClientSession(
        connector=connector, timeout=_timeout(request_timeout_s)
    ) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(p, at) for p, at in zip(prompts, arrivals)))
        return list(results), time.perf_counter() - start


async def server_info(base_url: str, api_key: str | None = None) -> dict:
    """``{"model": served id, "kv_cache_dtype", "kv_capacity_tokens" (sawkv only)}`` from
    ``/v1/models`` and, where the server has them, sawkv's ``/metrics`` series. Raises
    ``ConnectionError`` naming the URL when the server cannot be reached."""
    info: dict = {}
    root = base_url.rstrip("/").removesuffix("/v1")
    async with aiohttp.ClientSession(timeout=_timeout(30)) as session:
        try:
            async with session.get(
                base_url.rstrip("/") + "/models", headers=_headers(api_key)
            ) as r:
                if r.status != 200:
                    raise ConnectionError(f"GET {base_url}/models answered HTTP {r.status}")
                data = (await r.json()).get("data") or []
                if data:
                    info["model"] = data[0].get("id")
        except aiohttp.ClientError as e:
            raise ConnectionError(f"cannot reach {base_url}: {e}") from e
        try:
            async with session.get(root + "/metrics") as r:
                text = await r.text() if r.status == 200 else ""
        except aiohttp.ClientError:
            text = ""
    m = _INFO_RE.search(text)
    if m:
        info.update(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group("labels")))
    blocks, block_size = (
        _gauge(text, "sawkv_kv_blocks_total"),
        _gauge(text, "sawkv_engine_block_size"),
    )
    if blocks is not None and block_size is not None:
        info["kv_capacity_tokens"] = int(blocks * block_size)
    return info


_HIST_RE = re.compile(
    r"^[A-Za-z_:][\w:]*?[_:](?P<name>[a-z0-9_]+)_(?P<stat>sum|count)(?:\{[^}]*\})? (?P<v>\S+)$",
    re.MULTILINE,
)


async def server_histograms(base_url: str) -> dict[str, tuple[float, float]]:
    """``{short name: (sum, count)}`` of the server's request latency histograms in
    ``/metrics`` (summed over label sets), or ``{}`` where it has none or no ``/metrics``."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        async with aiohttp.ClientSession(timeout=_timeout(30)) as session:
            async with session.get(root + "/metrics") as r:
                text = await r.text() if r.status == 200 else ""
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return {}
    out: dict[str, list[float]] = {}
    for m in _HIST_RE.finditer(text):
        short = SERVER_HISTOGRAMS.get(m.group("name"))
        if short is not None:
            acc = out.setdefault(short, [0.0, 0.0])
            acc[m.group("stat") == "count"] += float(m.group("v"))
    return {k: (v[0], v[1]) for k, v in out.items()}


def _gauge(text: str, name: str) -> float | None:
    """The value of the first sample of ``name`` in Prometheus text, or None."""
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


async def wait_healthy(base_url: str, timeout_s: float) -> None:
    """Poll ``GET {root}/health`` until 200, or raise ``TimeoutError`` after ``timeout_s``."""
    root = base_url.rstrip("/").removesuffix("/v1")
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=_timeout(5)) as session:
        while True:
            try:
                async with session.get(root + "/health") as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{root}/health did not answer 200 within {timeout_s:.0f} s")
            await asyncio.sleep(0.5)
