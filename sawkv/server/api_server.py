"""The FastAPI app: OpenAI routes, API-key check, OpenAI-style errors, and ``serve``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE with
``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``. With an API key,
``/v1/*`` needs ``Authorization: Bearer <key>``; ``/health`` and ``/metrics`` stay open (probes
and scrapers). Every error body is ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sawkv.defaults import DEFAULT_KV_METHOD
from sawkv.server.async_engine import AsyncEngine, RequestStream
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


def _error_response(status_code: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status_code)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e.status_code, e.to_dict())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body')}: {err.get('msg')}"
            for err in errors
        )
        body = error_body(message or "invalid request", "invalid_request_error", ".".join(loc))
        return _error_response(400, body)

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
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise APIError(
                "Incorrect or missing API key (send 'Authorization: Bearer <key>').",
                status_code=401,
                type="authentication_error",
                code="invalid_api_key",
            )

    return check


def build_app(
    engine: AsyncEngine, *, api_key: str | None = None, served_model_name: str | None = None
) -> FastAPI:
    """The OpenAI-compatible app over ``engine``; its lifespan starts and stops the engine."""
    model = served_model_name or engine.model_name
    served_names = {model, engine.model_name}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="sawkv", lifespan=lifespan)
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
        job = prepare_completion(engine, body, served_names, model)
        return await _respond(engine, job, body.stream, request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        job = prepare_chat(engine, body, served_names, model)
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
    **engine_kwargs: Any,
) -> None:
    """Load ``model`` into an ``LLMEngine`` and serve it over HTTP until interrupted."""
    import uvicorn

    from sawkv.engine.llm_engine import LLMEngine

    llm_engine = LLMEngine.from_args(model, kv_cache_dtype=kv_cache_dtype, **engine_kwargs)
    engine = AsyncEngine(llm_engine, max_queue=max_queue)
    app = build_app(engine, api_key=api_key, served_model_name=served_model_name)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
