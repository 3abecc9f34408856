"""Completions and chat completions: prompt → token ids → engine → JSON body or SSE chunks.

Framework-free (no fastapi import): handlers in ``api_server`` call ``prepare_*`` to validate
and tokenize (raising ``APIError``), then ``collect`` for a JSON body or ``sse_events`` for a
stream. Both paths share ``OutputTextStream``, so streamed text equals non-streamed text.

``prepare_*`` tokenize, which takes seconds for a large prompt, so handlers run them in a worker
thread; before tokenizing they refuse text longer than ``max_model_len`` tokens could possibly
spell (:func:`check_text_size`), so a huge prompt costs a length check, not a tokenization.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sawkv.engine.detokenizer import OutputTextStream
from sawkv.engine.sampling_params import SamplingParams
from sawkv.server.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from sawkv.server.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_choice,
    completion_choice,
    envelope,
    error_body,
    usage_dict,
)

_DISCONNECT_POLL_S = 0.25


class ClientDisconnected(Exception):
    """The client went away before its non-streaming response was ready."""


@dataclass
class Job:
    """A validated request, ready for the engine.

    ``return_token_ids`` adds ``token_ids`` to each choice (vLLM's extension); it is forced on
    for models without a tokenizer, whose text output would be empty.
    """

    request_id: str
    is_chat: bool
    prompt_token_ids: list[int]
    params: SamplingParams
    model: str
    include_usage: bool
    return_token_ids: bool
    created: int

    @property
    def object_name(self) -> str:
        return "chat.completion" if self.is_chat else "text_completion"

    @property
    def chunk_object_name(self) -> str:
        return "chat.completion.chunk" if self.is_chat else "text_completion"


# ---- validation and tokenization ------------------------------------------------------------


def check_model(requested: str | None, served_names: set[str]) -> None:
    if requested and requested not in served_names:
        raise APIError(
            f"The model `{requested}` does not exist; this server serves {sorted(served_names)}.",
            status_code=404,
            param="model",
            code="model_not_found",
        )


def check_text_size(engine: AsyncEngine, num_chars: int, param: str) -> None:
    """Refuse text that cannot fit in ``max_model_len`` tokens, without tokenizing it.

    No token of the vocabulary spells more than ``engine.max_chars_per_token`` characters, so
    text longer than ``max_model_len`` times that has more than ``max_model_len`` tokens.
    """
    limit = engine.max_prompt_chars
    if limit is not None and num_chars > limit:
        raise APIError(
            f"This model's maximum context length is {engine.max_model_len} tokens; the "
            f"{param} has {num_chars} characters, more than {engine.max_model_len} tokens "
            f"can hold (at most {engine.max_chars_per_token} characters per token).",
            param=param,
            code="context_length_exceeded",
        )


def _check_prompt(engine: AsyncEngine, prompt_token_ids: list[int], param: str) -> None:
    num_prompt = len(prompt_token_ids)
    if num_prompt >= engine.max_model_len:
        raise APIError(
            f"This model's maximum context length is {engine.max_model_len} tokens, but the "
            f"prompt has {num_prompt} tokens (at least one must be left for the completion).",
            param=param,
            code="context_length_exceeded",
        )
    vocab_size = engine.vocab_size
    if vocab_size and any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise APIError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")


def _check_total_len(engine: AsyncEngine, num_prompt: int, max_tokens: int, param: str) -> None:
    """vLLM's rule and wording: prompt + requested completion must fit the context."""
    total = num_prompt + max_tokens
    if total > engine.max_model_len:
        raise APIError(
            f"This model's maximum context length is {engine.max_model_len} tokens. However, "
            f"you requested {total} tokens ({num_prompt} in the prompt, {max_tokens} in the "
            f"completion). Please reduce the length of the prompt or {param}.",
            param=param,
            code="context_length_exceeded",
        )


def _tokenize(engine: AsyncEngine, prompt: str | list[int]) -> list[int]:
    if not isinstance(prompt, str):
        return list(prompt)
    if engine.tokenizer is None:
        raise APIError("this model has no tokenizer: send the prompt as token ids", param="prompt")
    check_text_size(engine, len(prompt), "prompt")
    return list(engine.tokenizer(prompt).input_ids)


def _apply_chat_template(engine: AsyncEngine, body: ChatCompletionRequest) -> list[int]:
    tokenizer = engine.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError("this model has no chat template: use /v1/completions", param="messages")
    check_text_size(engine, body.num_chars, "messages")
    messages = [m.to_template_dict() for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - template errors (role order, ...) are the client's
        raise APIError(f"cannot apply the chat template: {e}", param="messages") from e
    # The template already holds the special tokens (BOS, role markers).
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def prepare_completion(
    engine: AsyncEngine, body: CompletionRequest, served_names: set[str], model: str
) -> Job:
    check_model(body.model, served_names)
    body.check_unsupported()
    prompt_token_ids = _tokenize(engine, body.single_prompt())
    _check_prompt(engine, prompt_token_ids, "prompt")
    max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    _check_total_len(engine, len(prompt_token_ids), max_tokens, "max_tokens")
    return Job(
        request_id=f"cmpl-{uuid.uuid4().hex}",
        is_chat=False,
        prompt_token_ids=prompt_token_ids,
        params=body.to_sampling_params(max_tokens),
        model=model,
        include_usage=body.include_usage,
        return_token_ids=body.return_token_ids or engine.tokenizer is None,
        created=int(time.time()),
    )


def prepare_chat(
    engine: AsyncEngine, body: ChatCompletionRequest, served_names: set[str], model: str
) -> Job:
    check_model(body.model, served_names)
    body.check_unsupported()
    prompt_token_ids = _apply_chat_template(engine, body)
    _check_prompt(engine, prompt_token_ids, "messages")
    max_tokens = body.requested_max_tokens
    if max_tokens is None:  # chat default: up to the context length
        max_tokens = engine.max_model_len - len(prompt_token_ids)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    _check_total_len(engine, len(prompt_token_ids), max_tokens, param)
    return Job(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        is_chat=True,
        prompt_token_ids=prompt_token_ids,
        params=body.to_sampling_params(max_tokens),
        model=model,
        include_usage=body.include_usage,
        return_token_ids=body.return_token_ids or engine.tokenizer is None,
        created=int(time.time()),
    )


async def submit(engine: AsyncEngine, job: Job) -> RequestStream:
    """Admit a job; engine refusals become API errors with the right status code."""
    try:
        return await engine.add_request(job.request_id, job.prompt_token_ids, job.params)
    except QueueFullError as e:
        raise APIError(str(e), status_code=429, type="rate_limit_error", code="queue_full") from e
    except EngineDeadError as e:
        raise APIError(str(e), status_code=503, type="server_error", code="engine_dead") from e
    except ValueError as e:  # the engine's own validation (e.g. prompt length)
        raise APIError(str(e), param="prompt") from e


# ---- responses ------------------------------------------------------------------------------


def _choice(job: Job, text: str, finish_reason: str | None, ids: list[int] | None, chunk: bool):
    if not job.is_chat:
        return completion_choice(text, finish_reason, ids)
    if chunk:
        delta = {"content": text} if text else {}
        return chat_choice(delta, finish_reason, is_chunk=True, token_ids=ids)
    message = {"role": "assistant", "content": text}
    return chat_choice(message, finish_reason, is_chunk=False, token_ids=ids)


async def collect(
    engine: AsyncEngine,
    job: Job,
    stream: RequestStream,
    is_disconnected: Callable[[], Awaitable[bool]],
) -> dict[str, Any]:
    """Run a request to completion and build the JSON body; abort if the client leaves."""
    text_stream = OutputTextStream(engine.tokenizer, job.prompt_token_ids, job.params.stop)

    async def consume():
        pieces, last = [], None
        async for out in stream:
            pieces.append(text_stream.update(out.new_token_ids, out.finished))
            last = out
        return "".join(pieces), last

    task = asyncio.ensure_future(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if not task.done() and await is_disconnected():
                task.cancel()
                raise ClientDisconnected(job.request_id)
        text, last = task.result()
    except EngineDeadError as e:  # stopped (shutdown drain) or failed: not this request's fault
        raise APIError(str(e), status_code=503, type="server_error", code="engine_dead") from e
    except RuntimeError as e:
        raise APIError(str(e), status_code=500, type="server_error", code="engine_error") from e
    finally:
        stream.close()
    ids = list(last.output_token_ids) if job.return_token_ids else None
    usage = usage_dict(len(job.prompt_token_ids), len(last.output_token_ids))
    choice = _choice(job, text, last.finish_reason, ids, chunk=False)
    return envelope(job.object_name, job.request_id, job.model, [choice], usage, job.created)


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def sse_events(engine: AsyncEngine, job: Job, stream: RequestStream) -> AsyncIterator[str]:
    """Server-sent events: ``data: {chunk}`` per step, optional usage chunk, ``data: [DONE]``."""
    text_stream = OutputTextStream(engine.tokenizer, job.prompt_token_ids, job.params.stop)
    name = job.chunk_object_name
    num_completion = 0
    try:
        if job.is_chat:  # OpenAI sends the role first, alone
            first = chat_choice({"role": "assistant", "content": ""}, None, is_chunk=True)
            yield _sse(envelope(name, job.request_id, job.model, [first], created=job.created))
        async for out in stream:
            delta = text_stream.update(out.new_token_ids, out.finished)
            num_completion = len(out.output_token_ids)
            ids = list(out.new_token_ids) if job.return_token_ids else None
            if not (delta or out.finished or (ids and job.return_token_ids)):
                continue
            choice = _choice(job, delta, out.finish_reason, ids, chunk=True)
            yield _sse(envelope(name, job.request_id, job.model, [choice], created=job.created))
        if job.include_usage:
            usage = usage_dict(len(job.prompt_token_ids), num_completion)
            yield _sse(envelope(name, job.request_id, job.model, [], usage, job.created))
    except (EngineDeadError, RuntimeError) as e:  # headers are sent: report in-band
        yield _sse(error_body(str(e), "server_error", None, "engine_error"))
    finally:
        stream.close()
    yield "data: [DONE]\n\n"
