"""The OpenAI request and response bodies of ``codetune serve``, and its errors in OpenAI's shape.

Requests are strict: ``max_tokens: true`` or ``"temperature": "1"`` is a 400, not a silent
coercion; unknown parameters are refused by name rather than ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..recipe import SEED_MAX


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return ErrorBody(
            error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        ).model_dump(mode="json")


# ---------------------------------------------------------------------------------------
# The OpenAI request bodies


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


NonEmptyStr = Annotated[str, Field(min_length=1)]
# the recipe's generation.seed and numpy's seed: an unsigned 32-bit integer (OpenAI's int64 is wider)
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        # "developer" is OpenAI's newer name for the system turn; chat templates know "system"
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class OpenAIRequest(_Strict):
    """What a chat and a text completion request have in common."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=4)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[str, Bias], Field(max_length=1024)] | None = None
    user: str | None = None

    def unsupported(self) -> dict[str, Any]:
        """Parameters set to something this server does not do: refused by name, never ignored."""
        return {}

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> dict[str, Any]:
        bad = {
            "logprobs": self.logprobs if self.logprobs else None,
            "top_logprobs": self.top_logprobs if self.top_logprobs else None,
            "tools": self.tools if self.tools else None,
            "functions": self.functions if self.functions else None,
            "tool_choice": self.tool_choice if self.tool_choice not in (None, "none", "auto") else None,
            "function_call": self.function_call if self.function_call not in (None, "none", "auto") else None,
            "response_format": self.response_format if self.response_format not in (None, {"type": "text"}) else None,
        }
        return {k: v for k, v in bad.items() if v is not None}


class CompletionRequest(OpenAIRequest):
    prompt: str
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def unsupported(self) -> dict[str, Any]:
        bad = {
            "logprobs": self.logprobs,
            "echo": self.echo or None,
            "suffix": self.suffix or None,
            "best_of": self.best_of if self.best_of not in (None, 1) else None,
        }
        return {k: v for k, v in bad.items() if v is not None}


_UNION_TAG = re.compile(r"str|int|float|bool|none|constrained-\w+|[\w-]+\[.*\]")


def invalid_request(exc: ValidationError) -> APIError:
    """The most specific problem of a request body, as a 400 that names the field."""
    # of a union's failed branches ("content" is a string, or a list of parts), the deepest one says the most
    err = max(exc.errors(), key=lambda e: len(e["loc"]))
    # pydantic adds the union member it tried ("str", "list[...]") to the location; a client knows fields only
    *path, last = err["loc"] or ("",)
    loc = [str(p) for p in path if not (isinstance(p, str) and _UNION_TAG.fullmatch(p))]
    if not (isinstance(last, str) and _UNION_TAG.fullmatch(last)) or err["type"] == "extra_forbidden":
        loc.append(str(last))
    where = ".".join(p for p in loc if p)
    if err["type"] == "extra_forbidden":
        message = f"unknown parameter {where!r}: this server does not support it"
    elif err["type"] == "json_invalid":
        message = f"the request body is not valid JSON: {err['msg'].removeprefix('Invalid JSON: ')}"
    elif not where:
        message = f"the request body must be a JSON object: {err['msg']}"
    else:
        message = f"{where}: {err['msg']}"
    return APIError(400, message, param=where or None)


# ---------------------------------------------------------------------------------------
# The OpenAI response bodies


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


FinishReason = Literal["stop", "length"]


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Out):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Out):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Out):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class Completion(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Health(_Out):
    status: Literal["ok"] = "ok"
    model: str


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "codetune"


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(_Out):
    error: ErrorDetail
