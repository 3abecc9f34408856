"""OpenAI-compatible HTTP server: FastAPI app, async engine loop, protocol types, metrics.

Modules (fastapi/uvicorn are imported only by ``api_server``, so the rest stays importable
without them):

- ``protocol``      request bodies (pydantic), OpenAI-style errors, sampling-param conversion
- ``async_engine``  one thread drives ``engine.step()``; requests wait on asyncio queues
- ``serving``       completions/chat: validate, tokenize, run, build JSON or SSE chunks
- ``metrics``       Prometheus text exposition of KV blocks, requests and token rates
- ``api_server``    the FastAPI app (``build_app``) and ``serve`` used by ``sawkv serve``
- ``cli``           the ``sawkv serve`` options (typer only), registered in ``sawkv/cli.py``
"""

from __future__ import annotations
