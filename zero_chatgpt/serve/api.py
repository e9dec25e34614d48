"""The wire format of the server: OpenAI's chat-completions request, response, stream chunk and error
shapes, as pydantic models. FastAPI builds /openapi.json from these same classes, so the schema says
exactly what the server accepts and returns (tests fuzz the server from it with schemathesis).

Requests are strict: a wrong type ("0.5" for a number, 1 for a bool) or an unknown field is a 400
naming the parameter, never silently coerced or ignored.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

MAX_CHOICES = 8        # n: the most choices one request may ask for (also bounded by the slots)
MAX_STOP = 4           # as OpenAI's API


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="'developer' is read as 'system' (OpenAI's newer name for it)")
    content: str | list[TextPart] = Field(description="text, or a list of text parts (joined)")
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="send a last chunk with `usage` (and no choices)")


class ChatCompletionRequest(_Strict):
    model: str = Field(description="the served model's id (GET /v1/models)")
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default: the run's chat.temperature")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling; default: the run's chat.top_p")
    max_tokens: int | None = Field(None, ge=1, description="longest answer in tokens (bounded by the server's limit)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens (wins if both)")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings that end the answer "
                                                            "(not included in it)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1 - MAX_CHOICES,
                             description="same seed, same request: same answer")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="how many answers to sample")
    stream: bool = Field(False, description="send server-sent events, ending with `data: [DONE]`")
    stream_options: StreamOptions | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class _Completion(BaseModel):
    """What a completion and each of its stream chunks both carry."""
    id: str
    created: int
    model: str
    system_fingerprint: str


class ChatCompletion(_Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """Only the fields a chunk carries: the first chunk of a choice has the role, later ones the text
    (OpenAI sends no `"role": null`); the last one is empty."""
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present(self) -> dict:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Completion):
    """One `data:` event of a stream (documented here; the stream itself is text/event-stream)."""
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "draining", "failed"] = Field(description="failed (with HTTP 503): the engine has "
                                                                    "stopped, restart the server")
    error: str | None = Field(None, description="why it failed (only then)")
    model: str
    slots: int = Field(description="sequences decoded together")
    busy: int = Field(description="slots in use now")
    queued: int = Field(description="requests waiting for a slot")
    prefill_s: float = Field(description="seconds the engine has spent on prompt forwards since it started")
    decode_s: float = Field(description="seconds the engine has spent on decode steps since it started")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _err(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


# What each route may answer besides 200, for the OpenAPI schema (schemathesis checks responses against it).
ERRORS_V1 = {401: _err("missing or wrong API key (with --api-key)"), 404: _err("unknown model or route"),
             413: _err("request body too large"), 500: _err("internal error (a bug: please report it)")}
ERRORS_CHAT = {400: _err("invalid request: the message and `param` say what"), **ERRORS_V1,
               408: _err("the body did not arrive within the server's --body-timeout"),
               429: {**_err("too many requests waiting"),
                     "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
               503: _err("the server is shutting down, or its engine has failed")}
