"""OpenAI wire format: request bodies, error bodies, response and stream-chunk builders.

Request bodies are pydantic models (pydantic ships with fastapi); unknown fields are ignored, as
the OpenAI client forwards ``extra_body`` fields at the top level, but OpenAI options the engine
does not implement (tools, response formats, logprobs, n > 1, ...) are refused with a 400 rather
than silently dropped. Field bounds are declared on the models, so pydantic answers out-of-range
values (``temperature`` above OpenAI's 2, a ``seed`` beyond 64 bits, NaN/Infinity, a lone UTF-16
surrogate in a string) with a 400 naming the field. Sampling fields become a ``SamplingParams``,
whose own checks (ValueError) become 400 errors naming the parameter.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sawkv.engine.sampling_params import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # torch.Generator seeds and token-id tensors


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _encodable(text: str) -> str:
    """Reject strings that are not valid Unicode text (JSON allows a lone ``\\ud800`` escape;
    the tokenizer and the UTF-8 response encoder do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"invalid Unicode: lone surrogate {text[e.start]!r} at character {e.start}"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
TokenId = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]  # range-checked against the vocab
_STRICT = ConfigDict(extra="ignore", allow_inf_nan=False)  # NaN/Infinity parse as JSON in Python


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions (OpenAI + common extensions)."""

    model_config = _STRICT

    model: Text | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's documented range
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Text | None = None
    # Refused when set (check_unsupported): accepted by OpenAI, not implemented here.
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    # Extensions (vLLM names), passed by the OpenAI client through ``extra_body``.
    top_k: int = Field(default=-1, ge=-1, le=INT64_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    return_token_ids: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_unsupported(self) -> None:
        """Refuse options the engine does not implement instead of silently ignoring them."""
        if self.n != 1:
            raise APIError(f"n must be 1 (got {self.n}): one choice per request", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(f"{name} is not supported (must be 0)", param=name)
        if self.logit_bias:
            raise APIError("logit_bias is not supported", param="logit_bias")
        if self.best_of not in (None, 1):
            raise APIError(f"best_of must be 1 (got {self.best_of})", param="best_of")

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """Build the engine's params; its ValueError becomes a 400 naming the field."""
        try:
            return SamplingParams(
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                seed=self.seed,
                max_tokens=max_tokens,
                stop=self.stop or [],
                stop_token_ids=self.stop_token_ids or [],
                ignore_eos=self.ignore_eos,
                # the response's OutputTextStream turns ids into text, off the engine thread;
                # the engine decodes only when a stop string needs the text
                detokenize=False,
            )
        except ValueError as e:
            # SamplingParams messages start with the field name ("top_p must be ...").
            field_name = str(e).split(" ", 1)[0]
            raise APIError(str(e), param=field_name) from e


class CompletionRequest(_GenerationRequest):
    """Body of ``POST /v1/completions``; ``prompt`` is text or token ids (one prompt)."""

    prompt: Text | list[TokenId] | list[Text] | list[list[TokenId]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise APIError("echo is not supported", param="echo")
        if self.logprobs is not None:
            raise APIError("logprobs are not supported", param="logprobs")
        if self.suffix:
            raise APIError("suffix is not supported", param="suffix")

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request, as text or token ids."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(
                    f"batched prompts are not supported (got {len(p)}); send one per request",
                    param="prompt",
                )
            p = p[0]
        if p == "" or p == []:
            raise APIError("prompt must not be empty", param="prompt")
        return p


class ContentPart(BaseModel):
    model_config = _STRICT
    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    """One message; ``tool`` and ``function`` messages are refused (no tool calling), and
    ``developer`` (OpenAI's newer name for ``system``) reaches the template as ``system``."""

    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None

    def to_template_dict(self) -> dict[str, str]:
        """The {role, content} dict a chat template expects; only text parts are supported."""
        role = "system" if self.role == "developer" else self.role
        if self.content is None or isinstance(self.content, str):
            return {"role": role, "content": self.content or ""}
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(
                    f"content part type {part.type!r} is not supported", param="messages"
                )
            texts.append(part.text)
        return {"role": role, "content": "".join(texts)}

    @property
    def num_chars(self) -> int:
        if self.content is None or isinstance(self.content, str):
            return len(self.content or "")
        return sum(len(p.text or "") for p in self.content)


class ChatCompletionRequest(_GenerationRequest):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Refused when set: no tool calling or constrained decoding (plain text only).
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.logprobs or self.top_logprobs:
            raise APIError("logprobs are not supported", param="logprobs")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise APIError(
                    f"{name} are not supported: this server has no tool calling", param=name
                )
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise APIError(
                    f"{name} is not supported: this server has no tool calling", param=name
                )
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise APIError(
                "response_format is not supported (only {'type': 'text'}): no constrained decoding",
                param="response_format",
            )

    @property
    def num_chars(self) -> int:
        """Characters of message text (a cheap bound on the prompt's size before templating)."""
        return sum(m.num_chars for m in self.messages)

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


FinishReason = Literal["stop", "length", "abort"] | None


def usage_dict(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }


def completion_choice(
    text: str, finish_reason: FinishReason, token_ids: list[int] | None = None
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_choice(
    delta_or_message: dict[str, Any],
    finish_reason: FinishReason,
    *,
    is_chunk: bool,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "delta" if is_chunk else "message": delta_or_message,
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def envelope(
    object_name: str,
    request_id: str,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, int] | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A response or stream chunk: ``{id, object, created, model, choices[, usage]}``."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": object_name,
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body
