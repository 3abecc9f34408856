"""Async front of the engine: one thread owns the engine, requests wait on asyncio queues.

The engine is not thread-safe, so only the engine thread touches it. The event loop talks to it
through a command queue (add, abort); the thread drains commands, runs ``engine.step()`` while
work remains, and hands each ``RequestOutput`` to its request's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``. After every step it publishes a stats snapshot that ``/metrics``
reads without touching the engine.

    event loop                             engine thread
    add_request() --("add", ...)--> cmds   drain cmds -> engine.add_request
      await admitted  <----------------------- resolved (or the ValueError)
    async for out in stream  <---------------- engine.step() -> outputs
    stream.close() --("abort", id)--> cmds -> engine.abort_request (pages freed)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from typing import Any

from sawkv.engine.outputs import RequestOutput
from sawkv.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05  # how long the idle engine thread blocks on the command queue
_RATE_WINDOW_S = 10.0  # tokens/s gauges average over this window


class QueueFullError(Exception):
    """More requests in flight than ``max_queue`` allows (answered 429)."""


class EngineDeadError(RuntimeError):
    """The engine thread failed or was stopped (answered 500/503)."""


class RequestStream:
    """One request's outputs, as an async iterator of ``RequestOutput`` until finished.

    ``close()`` is idempotent: it aborts the request if it has not finished (freeing its pages)
    and releases its slot in the in-flight count. Iteration raises the engine's error if the
    engine failed.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self._closed = False
        engine.num_in_flight += 1

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from the engine thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:
            self.finished = True
            self.close()
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine.num_in_flight -= 1
        if not self.finished:
            self.engine.abort(self.request_id)


class AsyncEngine:
    """Drives an ``LLMEngine`` from a background thread for concurrent async requests.

    ``max_queue`` bounds the requests in flight (admitted, not yet finished: running or
    waiting); one more raises ``QueueFullError``. ``None`` means no bound.
    """

    def __init__(self, engine: Any, max_queue: int | None = None) -> None:
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.tokenizer = getattr(engine, "tokenizer", None)
        self.model_name = str(engine.model_name)
        self.max_model_len = int(engine.max_model_len)
        self.vocab_size = _vocab_size(engine)
        self.max_chars_per_token = _max_chars_per_token(self.tokenizer)
        self.num_in_flight = 0  # event-loop side only
        self._stopping: BaseException | None = None  # set by stop_requests (shutdown drain)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._stats: dict[str, Any] = {}
        self._history: deque[tuple[float, int, int]] = deque()  # (time, prompt, gen) totals
        self._refresh_stats()

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="sawkv-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def max_prompt_chars(self) -> int | None:
        """Longest text that can still fit ``max_model_len`` tokens (None: no tokenizer)."""
        if self.max_chars_per_token is None:
            return None
        return self.max_model_len * self.max_chars_per_token

    def stop_requests(self, error: BaseException) -> None:
        """Refuse new requests and end every admitted one with ``error`` (frees their pages).

        The end of a shutdown drain: streams get ``error`` in-band, waiting clients an error
        response, so connections close and the server can exit.
        """
        self._stopping = error
        self._commands.put(("fail_all", error))

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    # ---- event-loop API --------------------------------------------------------------------

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> RequestStream:
        """Submit a request; return once the engine has admitted it.

        Raises ``QueueFullError``, ``EngineDeadError``, or the engine's ``ValueError`` (e.g.
        prompt too long) before anything is streamed, so callers can answer with a status code.
        The caller must ``close()`` the returned stream (it aborts an unfinished request).
        """
        if self._stopping is not None:
            raise EngineDeadError(str(self._stopping))
        if not self.is_alive:
            raise EngineDeadError(f"engine is not running: {self._error!r}")
        if self.max_queue is not None and self.num_in_flight >= self.max_queue:
            raise QueueFullError(
                f"server is at its limit of {self.max_queue} requests in flight; retry later"
            )
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id, loop)
        admitted = loop.create_future()
        self._commands.put(("add", request_id, prompt_token_ids, params, stream, admitted))
        try:
            await admitted
        except BaseException:
            stream.close()  # rejected, or the caller was cancelled while waiting
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> dict[str, Any]:
        """Latest engine stats plus token rates, as published by the engine thread."""
        return dict(self._stats)

    # ---- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    self._step()  # refreshes the stats itself
                else:
                    self._refresh_stats()
        except BaseException as e:  # noqa: BLE001 - any failure kills the loop; tell everyone
            logger.exception("engine thread failed")
            self._error = e
            error = EngineDeadError(f"engine failed: {e!r}")
            self._fail_all(error)
            self._fail_pending(error)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block else None
            while True:
                if command is not None:
                    self._execute(command)
                command = self._commands.get_nowait()
        except queue.Empty:
            return

    def _execute(self, command: tuple) -> None:
        if command[0] == "abort":
            self._abort(command[1])
            return
        if command[0] == "fail_all":
            self._fail_all(command[1])
            self._fail_pending(command[1])
            return
        _, request_id, prompt_token_ids, params, stream, admitted = command
        try:
            self.engine.add_request(request_id, prompt_token_ids, params)
        except Exception as e:  # noqa: BLE001 - rejected requests get the engine's error
            stream.loop.call_soon_threadsafe(_set_exception, admitted, e)
            return
        self._streams[request_id] = stream
        stream.loop.call_soon_threadsafe(_set_result, admitted)

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None:
            return  # already finished (or never admitted): nothing holds pages
        self.engine.abort_request(request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the requests in this batch, keep serving
            logger.exception("engine.step() failed; aborting all requests")
            self._fail_all(RuntimeError(f"engine step failed: {e!r}"))
            self._refresh_stats()
            return
        # before any client hears of this step, so /metrics read after a response already
        # counts it (its tokens, its finished request's latency)
        self._refresh_stats()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            try:  # abort before telling the client, so its pages are free when it hears
                self._abort(request_id)
            except Exception:  # noqa: BLE001 - best effort while failing
                self._streams.pop(request_id, None)
            stream.put(error)

    def _fail_pending(self, error: BaseException) -> None:
        """Reject requests submitted but never admitted (the loop is gone)."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                stream, admitted = command[4], command[5]
                stream.loop.call_soon_threadsafe(_set_exception, admitted, error)

    def _refresh_stats(self) -> None:
        stats = dict(self.engine.stats())
        now = time.monotonic()
        prompt = int(stats.get("num_prompt_tokens_total", 0))
        gen = int(stats.get("num_generation_tokens_total", 0))
        self._history.append((now, prompt, gen))
        while len(self._history) > 2 and now - self._history[1][0] >= _RATE_WINDOW_S:
            self._history.popleft()
        t0, prompt0, gen0 = self._history[0]
        elapsed = now - t0
        stats["prompt_tokens_per_s"] = (prompt - prompt0) / elapsed if elapsed > 0 else 0.0
        stats["generation_tokens_per_s"] = (gen - gen0) / elapsed if elapsed > 0 else 0.0
        self._stats = stats


def _set_result(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _max_chars_per_token(tokenizer: Any) -> int | None:
    """Most characters one token of ``tokenizer`` can spell, from its vocabulary's strings.

    A vocabulary string is never shorter than the text it decodes to (byte-level BPE spells one
    byte per character, byte-fallback tokens are ``<0x..>``), so this bounds the characters per
    token of any prompt; None when unknown (no tokenizer, or one without ``get_vocab``).
    """
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - no tokenizer, or an exotic one: no bound
        return None
    return max((len(token) for token in vocab), default=None)


def _vocab_size(engine: Any) -> int | None:
    """Largest valid token id + 1, to reject bad prompt ids before they reach the model."""
    for owner in (engine, getattr(engine, "model_config", None), getattr(engine, "config", None)):
        size = getattr(owner, "vocab_size", None)
        if isinstance(size, int) and size > 0:
            return size
    tokenizer = getattr(engine, "tokenizer", None)
    return len(tokenizer) if tokenizer is not None else None
