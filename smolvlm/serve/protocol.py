"""The OpenAI chat-completions request, as pydantic models, and the response bodies, as plain dicts.

Request fields follow OpenAI's API reference (platform.openai.com/docs/api-reference/chat/create);
`video_url` content parts are vLLM's extension; `top_k` and `repetition_penalty` are extensions that
vLLM and llama.cpp's server also take. Fields this server does not implement (tools, response_format,
n > 1, audio, non-zero presence/frequency penalties) are refused with a 400 naming them, never ignored
in silence; fields it does not know at all are ignored (as vLLM does) and logged.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's limit (smolvlm.engine.params.MAX_LOGPROBS)


class _Strict(BaseModel):
    """Parts of a request: unknown keys are ignored, values are not coerced across types
    ("5" is not 5, 1.5 is not an int, 1 is not True)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str = Field(min_length=1)


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart]]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = None  # OpenAI marks these nullable: null means the default
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # OpenAI: any int64
    stop: Union[str, list[str], None] = None
    n: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # extensions (vLLM, llama.cpp)
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    # known to OpenAI, not implemented here: refused by name when set
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    logit_bias: Any = None

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        # JSON has one number type: 1 and 1.0 are the same temperature (strict mode would refuse 1)
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value


class BadRequest(Exception):
    """A request this server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


UNSUPPORTED = ("tools", "tool_choice", "functions", "response_format", "audio", "modalities", "logit_bias")


def parse_request(body: Any) -> ChatCompletionRequest:
    """The decoded JSON body -> a checked request, or BadRequest naming the first problem."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        message, where = _describe(e)
        raise BadRequest(message, param=where) from None
    for name in UNSUPPORTED:
        if getattr(request, name) is not None:
            raise BadRequest(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    if request.n not in (None, 1):
        raise BadRequest(f"n must be 1 (one choice per request), got {request.n}", param="n", code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) not in (None, 0.0):
            raise BadRequest(f"'{name}' is not supported (use repetition_penalty)", param=name, code="unsupported_parameter")
    if request.top_logprobs is not None and not request.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise BadRequest("max_tokens and max_completion_tokens differ; give one", param="max_tokens")
    if request.stream_options is not None and not request.stream:
        raise BadRequest("stream_options needs stream: true", param="stream_options")
    for m, message in enumerate(request.messages):
        if message.role == "assistant" and not isinstance(message.content, str) and any(
                p.type != "text" for p in message.content):
            raise BadRequest(f"messages.{m}: an assistant message holds text only", param=f"messages.{m}.content")
    return request


def _describe(error: ValidationError) -> tuple[str, str | None]:
    """pydantic's errors as one message and the field's path. A value that fits no branch of a union
    (content: a string or a list of parts) reports the branch that got furthest, not the first one."""
    errors = error.errors()
    best = max(errors, key=lambda e: len(e["loc"]))
    path: list[str] = []
    for part in map(str, best["loc"]):
        # skip union branches: 'str' / 'list[...]' (content's two forms) and a part's tag, which
        # pydantic puts before the field of the same name (content.0.image_url.image_url.url)
        if part == "str" or part.startswith(("list[", "union[", "function-")) or (path and path[-1] == part):
            continue
        path.append(part)
    where = ".".join(path)
    message = best["msg"]
    if best["type"] == "union_tag_invalid":
        message = f"unknown content part type {best['ctx'].get('tag')!r} (text, image_url, video_url)"
    elif where.endswith(".content") and best["type"] in ("string_type", "list_type"):
        message = "must be a string or a list of content parts"
    elif best["type"] == "literal_error" and where.endswith("role"):
        message = f"unknown role {best['input']!r} (system, developer, user, assistant)"
    return f"{where}: {message}" if where else message, where or None


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ------------------------------------------------------------------ responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion(id: str, model: str, created: int, text: str, finish_reason: str, logprobs: list | None,
               usage_: dict) -> dict:
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": finish_reason,
        }],
        "usage": usage_,
    }


def chunk(id: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
          logprobs: list | None = None, with_usage: bool = False) -> dict:
    body = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": finish_reason,
        }],
    }
    if with_usage:  # include_usage: every chunk has "usage": null, the last one the counts
        body["usage"] = None
    return body


def usage_chunk(id: str, model: str, created: int, usage_: dict) -> dict:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage_}


def now() -> int:
    return int(time.time())
