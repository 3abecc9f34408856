"""The FastAPI app: OpenAI routes, API-key check, OpenAI-style errors, and ``serve``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE with
``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``. With an API key,
``/v1/*`` needs ``Authorization: Bearer <key>``; ``/health`` and ``/metrics`` stay open (probes
and scrapers), and the interactive docs (``/docs``, ``/redoc``, ``/openapi.json``) are turned
off, since they describe the API to whoever asks. Every error body is
``{"error": {"message", "type", "param", "code"}}``.

Bodies larger than ``max_request_bytes`` are refused (413) from their ``Content-Length`` before
they are read, and validation plus tokenization run in a worker thread: a 50 MB prompt is
answered in milliseconds and ``/health`` keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sawkv.defaults import DEFAULT_KV_METHOD
from sawkv.server.async_engine import AsyncEngine, EngineDeadError, RequestStream
from sawkv.server.metrics import CONTENT_TYPE, render_metrics
from sawkv.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body
from sawkv.server.serving import (
    ClientDisconnected,
    collect,
    prepare_chat,
    prepare_completion,
    sse_events,
    submit,
)

logger = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 30.0
_SHUTDOWN_POLL_S = 0.1
_MIN_REQUEST_BYTES = 1 << 20  # room for JSON structure, many messages and token-id prompts


class _AbortingStreamingResponse(StreamingResponse):
    """An SSE response that aborts its request however the response ends.

    Starlette cancels the body iterator when the client disconnects; an iterator that never
    started would skip its own ``finally``, so the abort also lives here.
    """

    def __init__(self, content: Any, stream: RequestStream) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.headers["Cache-Control"] = "no-cache"
        self._request_stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._request_stream.close()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()


class _ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote client text, and a lone
    surrogate in it would make the default UTF-8 rendering raise (a 500 from the 400 path)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error_response(status_code: int, body: dict[str, Any]) -> JSONResponse:
    return _ASCIIJSONResponse(body, status_code=status_code)


def _field_path(loc: Any) -> str:
    """``("body", "messages", 0, "content", "function-after[...]")`` -> ``messages.0.content``:
    the field, without pydantic's union-member tags (not identifiers)."""
    parts = []
    for p in loc:
        if p == "body" and not parts:
            continue
        if not (isinstance(p, int) or str(p).isidentifier()):
            break
        parts.append(str(p))
    return ".".join(parts)


def _validation_body(e: RequestValidationError) -> dict[str, Any]:
    """pydantic's errors as one OpenAI error naming the first bad field (``messages.0.role``);
    one message per field (a union field reports each member's complaint: keep the first)."""
    errors = e.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # loc is ("body", <char offset>), not a field
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        message = f"the request body is not valid JSON: {detail} at character {first['loc'][-1]}"
        return error_body(message, "invalid_request_error")
    by_field: dict[str, str] = {}
    for err in errors:
        by_field.setdefault(_field_path(err.get("loc", ())), str(err.get("msg")))
    message = "; ".join(f"{path or 'request body'}: {msg}" for path, msg in by_field.items())
    param = _field_path(first.get("loc", ())) or None
    return error_body(message or "invalid request", "invalid_request_error", param)


class _BodyLimit:
    """ASGI middleware: answer 413 to bodies over ``max_bytes``, from a declared
    ``Content-Length`` without reading the body, or, for a chunked body, as soon as what has
    arrived passes the limit (such a body is buffered here, at most ``max_bytes``, and replayed)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: str) -> JSONResponse:
        message = f"request body is {size} bytes; this server accepts at most {self.max_bytes}"
        return _error_response(413, error_body(message, "invalid_request_error", None, "too_large"))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                return await self._too_large(declared.decode())(scope, receive, send)
            return await self.app(scope, receive, send)
        messages, received = [], 0
        while True:
            message = await receive()
            messages.append(message)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return await self._too_large(f"over {received}")(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e.status_code, e.to_dict())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(400, _validation_body(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(e.status_code, error_body(str(e.detail), kind))

    @app.exception_handler(ClientDisconnected)
    async def _client_gone(_: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return _error_response(500, error_body(f"internal error: {e!r}", "server_error"))


def _auth_dependency(api_key: str | None):
    expected = api_key.encode("utf-8") if api_key is not None else b""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Compare bytes: compare_digest refuses non-ASCII str (a TypeError, i.e. a 500).
        # Starlette decodes headers as latin-1, so this recovers the bytes that were sent.
        sent = token.strip().encode("latin-1")
        if scheme.lower() != "bearer" or not secrets.compare_digest(sent, expected):
            raise APIError(
                "Incorrect or missing API key (send 'Authorization: Bearer <key>').",
                status_code=401,
                type="authentication_error",
                code="invalid_api_key",
            )

    return check


def default_max_request_bytes(engine: AsyncEngine) -> int:
    """Room for the longest prompt that can fit: 6 bytes per character (a JSON ``\\uXXXX``
    escape) of ``max_prompt_chars``, or 8 per token id, plus 1 MiB."""
    chars = engine.max_prompt_chars or 0
    return _MIN_REQUEST_BYTES + max(6 * chars, 8 * engine.max_model_len)


async def _drain_on_shutdown(
    engine: AsyncEngine, is_shutting_down: Callable[[], bool], drain_timeout_s: float
) -> None:
    """Once the server starts shutting down (SIGTERM), give requests in flight
    ``drain_timeout_s`` to finish, then end the rest with an error so the process can exit."""
    while not is_shutting_down():
        await asyncio.sleep(_SHUTDOWN_POLL_S)
    deadline = time.monotonic() + drain_timeout_s
    logger.info(
        "shutting down: draining %d requests (up to %.0f s)", engine.num_in_flight, drain_timeout_s
    )
    while engine.num_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(_SHUTDOWN_POLL_S)
    if engine.num_in_flight:
        logger.warning("drain timeout: ending %d requests still in flight", engine.num_in_flight)
    engine.stop_requests(
        EngineDeadError(f"server shut down (drain timeout of {drain_timeout_s:g} s)")
    )


def build_app(
    engine: AsyncEngine,
    *,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_request_bytes: int | None = None,
    is_shutting_down: Callable[[], bool] | None = None,
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
) -> FastAPI:
    """The OpenAI-compatible app over ``engine``; its lifespan starts and stops the engine.

    ``max_request_bytes``: larger bodies get 413 (default :func:`default_max_request_bytes`).
    ``is_shutting_down``: polled by the lifespan (``serve`` passes uvicorn's exit flag); once
    true, requests in flight get ``drain_timeout_s`` to finish before they are ended.
    """
    model = served_model_name or engine.model_name
    served_names = {model, engine.model_name}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        drain = None
        if is_shutting_down is not None:
            drain = asyncio.create_task(
                _drain_on_shutdown(engine, is_shutting_down, drain_timeout_s)
            )
        try:
            yield
        finally:
            if drain is not None:
                drain.cancel()
            engine.shutdown()

    # The docs pages describe every route to whoever asks: off when a key guards the API.
    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="sawkv", lifespan=lifespan, **docs)
    limit = (
        max_request_bytes if max_request_bytes is not None else default_max_request_bytes(engine)
    )
    app.add_middleware(_BodyLimit, max_bytes=limit)
    _install_error_handlers(app)
    auth = [Depends(_auth_dependency(api_key))]

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return _error_response(503, error_body("engine is not running", "server_error"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = engine.stats()
        stats["num_in_flight"] = engine.num_in_flight
        return Response(render_metrics(stats, model), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> JSONResponse:
        card = {
            "id": model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "sawkv",
            "max_model_len": engine.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        # tokenizing is CPU work (seconds for a long prompt): keep it off the event loop
        job = await run_in_threadpool(prepare_completion, engine, body, served_names, model)
        return await _respond(engine, job, body.stream, request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        job = await run_in_threadpool(prepare_chat, engine, body, served_names, model)
        return await _respond(engine, job, body.stream, request)

    return app


async def _respond(engine: AsyncEngine, job: Any, stream: bool, request: Request) -> Response:
    request_stream = await submit(engine, job)
    if stream:
        return _AbortingStreamingResponse(sse_events(engine, job, request_stream), request_stream)
    body = await collect(engine, job, request_stream, request.is_disconnected)
    return JSONResponse(body)


def serve(
    model: str,
    *,
    kv_cache_dtype: str = DEFAULT_KV_METHOD,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_queue: int | None = None,
    served_model_name: str | None = None,
    log_level: str = "info",
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    **engine_kwargs: Any,
) -> None:
    """Load ``model`` into an ``LLMEngine`` and serve it over HTTP until SIGINT/SIGTERM.

    On SIGTERM the server stops accepting connections and gives requests in flight
    ``drain_timeout_s`` seconds to finish; the rest end with an error (an in-band error chunk
    for streams, 503 otherwise) and the process exits.
    """
    import uvicorn

    from sawkv.engine.llm_engine import LLMEngine

    llm_engine = LLMEngine.from_args(model, kv_cache_dtype=kv_cache_dtype, **engine_kwargs)
    engine = AsyncEngine(llm_engine, max_queue=max_queue)
    server: uvicorn.Server | None = None
    app = build_app(
        engine,
        api_key=api_key,
        served_model_name=served_model_name,
        is_shutting_down=lambda: server is not None and server.should_exit,
        drain_timeout_s=drain_timeout_s,
    )
    # uvicorn's own limit is a backstop: our drain ends the requests first, with an error.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(drain_timeout_s) + 5,
    )
    server = uvicorn.Server(config)
    _log_startup(llm_engine, host, port, api_key is not None)
    server.run()


def startup_summary(llm_engine: Any, host: str, port: int, has_api_key: bool) -> str:
    """One line: model, KV method, stored bits per element, pool size, context, address."""
    spec = llm_engine.spec
    elements_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim
    bits = spec.bytes_per_token * 8 / elements_per_token
    num_tokens = llm_engine.block_manager.num_blocks * spec.block_size
    return (
        f"sawkv serving {llm_engine.model_name}: kv cache {spec.method.name} "
        f"({bits:.2f} bits/element, {num_tokens} tokens in {llm_engine.block_manager.num_blocks} "
        f"pages), max_model_len {llm_engine.max_model_len}, on http://{host}:{port}/v1"
        f"{' (API key required)' if has_api_key else ''}"
    )


def _log_startup(llm_engine: Any, host: str, port: int, has_api_key: bool) -> None:
    # uvicorn configures logging only once it runs: print, so the line shows whatever the level.
    print(startup_summary(llm_engine, host, port, has_api_key), flush=True)
