"""``codetune serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a run or a merged model.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (both streamed with server-sent events when ``stream`` is true), and two
pages for people: the run report at ``GET /`` and a chat page at ``GET /chat``.

One model answers one request at a time: requests wait in a queue for the generation slot and are
never dropped. A client that disconnects, streaming or not, stops its generation at the next token
and frees the slot. Request bodies over ``max_request_bytes`` get a 413 before they are read. Every
request body is parsed by the pydantic models below (strict types, unknown parameters refused), so
a malformed request gets a 4xx with an OpenAI-style error body, never a 5xx, and the server keeps
serving. For more than one machine's worth of traffic, ``--engine vllm`` hands the same model and
adapter to vLLM's own OpenAI server instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .generate import first_stop
from .recipe import GenerationConfig, Recipe, RecipeError

log = logging.getLogger("codetune.serve")

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


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
# The OpenAI request bodies. Strict: `max_tokens: true` or `"temperature": "1"` is a 400, not a
# silent coercion; unknown parameters are refused by name rather than ignored.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


NonEmptyStr = Annotated[str, Field(min_length=1)]
# torch.manual_seed takes 64-bit seeds; OpenAI's seed is an int64.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
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


class _Request(_Strict):
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


class ChatRequest(_Request):
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
            "response_format": self.response_format
            if self.response_format not in (None, {"type": "text"})
            else None,
        }
        return {k: v for k, v in bad.items() if v is not None}


class CompletionRequest(_Request):
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


# ---------------------------------------------------------------------------------------
# The engine


@dataclass
class Engine:
    """The loaded model (as an :class:`~codetune.generate.InferenceSession`) and the one generation slot."""

    model: Any
    tokenizer: Any
    recipe: Recipe
    name: str
    max_tokens_limit: int
    source: str | None = None  # the run directory or model it was loaded from (the report at / reads it)

    def __post_init__(self):
        from .generate import InferenceSession

        self.session = InferenceSession(self.model, self.tokenizer, self.recipe.generation)
        self.slot = threading.Lock()
        # requests generated, requests whose client left, tokens generated: for tests and a status page
        self.stats = {"requests": 0, "cancelled": 0, "tokens": 0}
        self._stats_lock = threading.Lock()

    def count(self, **deltas: int) -> None:
        with self._stats_lock:
            for key, value in deltas.items():
                self.stats[key] += value

    @property
    def context(self) -> int:
        return self.session.context

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


def load_engine(
    source: str | Path, *, name: str | None = None, max_tokens_limit: int = 1024, recipe: Recipe | None = None
) -> Engine:
    from .generate import load_for_inference, quiet_libraries

    with quiet_libraries():
        loaded = load_for_inference(source, recipe=recipe)
    return Engine(
        loaded.model,
        loaded.tokenizer,
        loaded.recipe,
        name or Path(str(source)).name or str(source),
        max_tokens_limit,
        str(source),
    )


# ---------------------------------------------------------------------------------------
# Generation for one request


@dataclass
class _Job:
    prompt_ids: list[int]
    cfg: GenerationConfig
    stops: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)  # the client left
    enough: threading.Event = field(default_factory=threading.Event)  # the streamed answer hit a stop string


@dataclass
class _Result:
    text: str
    completion_tokens: int
    reason: str  # "stop", "length" or "cancelled"


_UNION_TAG = re.compile(r"str|int|float|bool|none|constrained-\w+|[\w-]+\[.*\]")


def _invalid(exc: ValidationError) -> APIError:
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


def _config(engine: Engine, req: _Request) -> GenerationConfig:
    """The request's OpenAI parameters as the session's generation settings."""
    from .generate import SettingsError

    max_tokens = (
        getattr(req, "max_completion_tokens", None) or req.max_tokens or engine.recipe.generation.max_new_tokens
    )
    if max_tokens > engine.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens {max_tokens} is over this server's limit of {engine.max_tokens_limit}",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    overrides: dict[str, Any] = {"max_new_tokens": max_tokens}
    if req.temperature is not None:  # a client that names a temperature asks for sampling at it; 0 is greedy
        overrides.update(temperature=req.temperature, do_sample=req.temperature > 0)
    if req.top_p is not None:
        overrides["top_p"] = req.top_p
    if req.seed is not None:
        overrides["seed"] = req.seed
    try:
        return engine.session.config(**overrides)
    except SettingsError as exc:
        raise APIError(400, f"{exc.param}: {exc.detail}", param=exc.param) from None


def _logit_bias(engine: Engine, req: _Request) -> dict[int, float]:
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < engine.vocab_size:
            raise APIError(
                400,
                f"logit_bias: {key!r} is not a token id of this model (0 to {engine.vocab_size - 1})",
                param="logit_bias",
            )
        bias[token] = value
    return bias


def _job(engine: Engine, req: ChatRequest | CompletionRequest) -> _Job:
    """Check the request against the model (runs in a worker thread: templating and tokenizing take time)."""
    from .generate import ContextError, TemplateRefused

    cfg = _config(engine, req)
    session = engine.session
    param = "messages" if isinstance(req, ChatRequest) else "prompt"
    if isinstance(req, ChatRequest):
        try:
            ids = session.prompt_ids([m.as_template_message() for m in req.messages])
        except TemplateRefused as exc:
            raise APIError(400, str(exc), param="messages") from None
    else:
        ids = session.encode(req.prompt)
    if not ids:
        raise APIError(400, f"{param}: the prompt is empty", param=param)
    try:
        # the server log gets the warning: the warnings module's filters are process-wide, not per thread
        (limit,) = session.fit([len(ids)], cfg, what=param, warn=log.warning)
    except ContextError as exc:
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
    return _Job(
        ids,
        cfg.model_copy(update={"max_new_tokens": limit}),
        stops=req.stops,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=_logit_bias(engine, req),
    )


def _halt_and_penalties(job: _Job) -> tuple[list, list]:
    """The request's own stopping criterion (its client left, or its stream hit a stop string) and its
    OpenAI logits processors (presence and frequency penalties, logit_bias)."""
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    n_prompt = len(job.prompt_ids)

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            halt = job.cancel.is_set() or job.enough.is_set()
            return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)

    class Penalties(LogitsProcessor):
        # OpenAI's definition: counts over the generated tokens only, not the prompt.
        def __call__(self, input_ids, scores):
            counts = torch.bincount(input_ids[0, n_prompt:], minlength=scores.shape[-1])[: scores.shape[-1]]
            counts = counts.to(scores.dtype).unsqueeze(0)
            return scores - counts * job.frequency_penalty - (counts > 0).to(scores.dtype) * job.presence_penalty

    class Bias(LogitsProcessor):
        def __init__(self):
            self.ids = torch.tensor(list(job.logit_bias), dtype=torch.long)
            self.values = torch.tensor(list(job.logit_bias.values()))

        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[:, self.ids.to(scores.device)] += self.values.to(scores.device, scores.dtype)
            return scores

    processors = []
    if job.presence_penalty or job.frequency_penalty:
        processors.append(Penalties())
    if job.logit_bias:
        processors.append(Bias())
    return [Cancelled()], processors


def _run(engine: Engine, job: _Job, streamer=None) -> _Result:
    """Generate for one job while holding the slot. A cancelled job (its client left) stops at the next token."""
    criteria, processors = _halt_and_penalties(job)
    # Wait for the slot, but give up as soon as the client has gone: a queue of abandoned requests
    # must not delay the next live one.
    while not engine.slot.acquire(timeout=0.05):
        if job.cancel.is_set():
            engine.count(cancelled=1)
            return _Result("", 0, "cancelled")
    try:
        if job.cancel.is_set():
            engine.count(cancelled=1)
            return _Result("", 0, "cancelled")
        answer = engine.session.complete(
            job.prompt_ids, job.cfg, stops=job.stops, streamer=streamer, criteria=criteria, processors=processors
        )
    finally:
        engine.slot.release()
    engine.count(requests=1, tokens=answer.tokens)
    if job.cancel.is_set():
        engine.count(cancelled=1)
        return _Result("", answer.tokens, "cancelled")
    return _Result(answer.text, answer.tokens, answer.reason)


class _StopFilter:
    """Streamed text with the stop strings held back: a piece that could begin a stop string waits until
    the next piece shows whether it does, so no part of a stop string ever reaches the client."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False

    def feed(self, piece: str) -> str:
        self.text += piece
        cut = first_stop(self.text, self.stops)
        if cut >= 0:
            self.stopped = True
            return self._emit(cut)
        held = max(
            (k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])),
            default=0,
        )
        return self._emit(len(self.text) - held)

    def flush(self) -> str:
        return "" if self.stopped else self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        out = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out


# ---------------------------------------------------------------------------------------
# Request guard: body size cap and API key, as plain ASGI so that nothing reads the body first


class _Guard:
    """Refuses an oversized body with 413 before reading it (by Content-Length, and by counting the
    bytes of a chunked body as they arrive), and requests to /v1/ without the API key with 401."""

    def __init__(self, app, *, max_bytes: int, api_key: str | None):
        self.app, self.max_bytes, self.api_key = app, max_bytes, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith("/v1/"):
            if headers.get("authorization", "") != f"Bearer {self.api_key}":
                err = APIError(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    code="invalid_api_key",
                    type_="authentication_error",
                )
                return await _send_error(send, err)
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await _send_error(send, APIError(400, f"Content-Length {length!r} is not a number"))
            if int(length) > self.max_bytes:
                return await _send_error(send, self._too_large())
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()  # answered by the app's APIError handler; the rest is never read
            return message

        return await self.app(scope, counted_receive, send)

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body is over this server's limit of {self.max_bytes} bytes (--max-request-bytes)",
            code="request_too_large",
        )


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------
# The app


def create_app(engine: Engine, *, api_key: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
    """The FastAPI app: the guard in front, OpenAI-style errors, the API routes, and the pages for people."""
    from fastapi import FastAPI

    from .report import add_pages

    app = FastAPI(title="codetune", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, max_bytes=max_request_bytes, api_key=api_key)
    _add_error_handlers(app)
    api = _Api(engine)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    # the run report at / and a chat page at /chat
    add_pages(app, engine, engine.source, auth=bool(api_key))
    return app


def _add_error_handlers(app) -> None:
    """Every error, FastAPI's and Starlette's included, answered in the OpenAI error shape (ErrorBody)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def api_error(_, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def validation(_, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return JSONResponse(APIError(400, err["msg"], param=".".join(str(p) for p in err["loc"][1:])).body(), 400)

    async def http_error(_, exc: StarletteHTTPException):
        # 404 / 405 in the same OpenAI error shape as everything else
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


class _Api:
    """The routes that use the model: parse a request, queue its generation, answer in OpenAI's bodies."""

    def __init__(self, engine: Engine):
        self.engine = engine

    async def health(self):
        return Health(model=self.engine.name).model_dump(mode="json")

    async def models(self):
        return ModelList(data=[ModelCard(id=self.engine.name)]).model_dump(mode="json")

    async def chat_completions(self, request: Request):
        return await self._complete(request, ChatRequest, "chat")

    async def completions(self, request: Request):
        return await self._complete(request, CompletionRequest, "text")

    async def _parse(self, request: Request, schema: type[_Request]) -> _Request:
        ctype = request.headers.get("content-type")
        if ctype is not None:
            media = ctype.split(";")[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                raise APIError(
                    400, f"Content-Type {ctype!r}: the request body must be JSON (Content-Type: application/json)"
                )
        raw = await request.body()  # bounded by _Guard
        try:
            # pydantic's own JSON parser: bounded nesting depth, no lone surrogates, no NaN
            req = await asyncio.to_thread(schema.model_validate_json, raw)
        except ValidationError as exc:
            raise _invalid(exc) from None
        if req.model != self.engine.name:
            raise APIError(
                404,
                f"the model {req.model!r} does not exist; this server has {self.engine.name!r}",
                param="model",
                code="model_not_found",
            )
        unsupported = req.unsupported()
        if unsupported:
            names = ", ".join(sorted(unsupported))
            raise APIError(
                400,
                f"this server does not support {names} (got {json.dumps(unsupported)[:200]}); leave "
                f"{'it' if len(unsupported) == 1 else 'them'} out",
                param=sorted(unsupported)[0],
                code="unsupported_parameter",
            )
        return req

    async def _complete(self, request: Request, schema: type[_Request], kind: str):
        from fastapi.responses import JSONResponse, StreamingResponse

        req = await self._parse(request, schema)
        job = await asyncio.to_thread(_job, self.engine, req)
        reply = _Reply(kind, self.engine.name, len(job.prompt_ids))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._events(request, job, reply, include_usage), media_type="text/event-stream")
        result = await self._until_done_or_gone(request, job)
        if result.reason == "cancelled":
            # nobody is there to read it; nginx's "client closed request", so a log shows what happened
            return JSONResponse(APIError(499, "the client closed the request").body(), status_code=499)
        return JSONResponse(reply.whole(result).model_dump(mode="json"))

    async def _until_done_or_gone(self, request: Request, job: _Job) -> _Result:
        """Generate in a worker thread while watching the connection: a client that left cancels its job."""
        task = asyncio.ensure_future(asyncio.to_thread(_run, self.engine, job))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.1)
                if not task.done() and await request.is_disconnected():
                    job.cancel.set()
            return task.result()
        except asyncio.CancelledError:
            job.cancel.set()
            raise

    async def _events(self, request: Request, job: _Job, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer, stop strings held back until they are ruled out."""
        generation = _StreamedRun(self.engine, job)
        stop_filter = _StopFilter(job.stops)
        try:
            if reply.kind == "chat":
                yield _sse(reply.chunk(None, first=True))
            async with contextlib.aclosing(generation.pieces(request)) as pieces:
                async for piece in pieces:
                    text = stop_filter.feed(piece)
                    if text:
                        yield _sse(reply.chunk(text))
                    if stop_filter.stopped:
                        job.enough.set()  # the rest would be cut anyway
                        break
            if generation.gone:  # nobody is there to read the rest
                return
            result = await generation.finished()
            tail = stop_filter.flush()
            if tail:
                yield _sse(reply.chunk(tail))
            stopped = stop_filter.stopped or result is None or result.reason == "cancelled"
            yield _sse(reply.chunk(None, "stop" if stopped else result.reason))
            if include_usage:
                yield _sse(reply.chunk(None, usage=reply.usage(result.completion_tokens if result else 0)))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()


@dataclass
class _Reply:
    """The OpenAI response bodies of one request: a whole answer, or the chunks of a streamed one."""

    kind: str  # "chat" or "text"
    model: str
    prompt_tokens: int
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def usage(self, completion_tokens: int) -> Usage:
        n = self.prompt_tokens
        return Usage(prompt_tokens=n, completion_tokens=completion_tokens, total_tokens=n + completion_tokens)

    def whole(self, result: _Result) -> ChatCompletion | Completion:
        head = dict(id=self.id, created=self.created, model=self.model, usage=self.usage(result.completion_tokens))
        if self.kind == "chat":
            choice = ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.reason)
            return ChatCompletion(choices=[choice], **head)
        return Completion(choices=[CompletionChoice(text=result.text, finish_reason=result.reason)], **head)

    def chunk(
        self, delta: str | None, reason: str | None = None, *, first: bool = False, usage: Usage | None = None
    ) -> ChatCompletionChunk | Completion:
        head = dict(id=self.id, created=self.created, model=self.model, usage=usage)
        if self.kind == "chat":
            d = Delta(role="assistant", content="") if first else Delta(content=delta)
            return ChatCompletionChunk(choices=[] if usage else [ChunkChoice(delta=d, finish_reason=reason)], **head)
        return Completion(choices=[] if usage else [CompletionChoice(text=delta or "", finish_reason=reason)], **head)


class _StreamedRun:
    """One job generating in a worker thread, its text read piece by piece as it comes."""

    def __init__(self, engine: Engine, job: _Job):
        from transformers import TextIteratorStreamer

        self.job, self.result, self.gone = job, None, False
        self.streamer = TextIteratorStreamer(
            engine.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.05
        )
        self.worker = threading.Thread(target=self._work, args=(engine,), daemon=True)
        self.worker.start()

    def _work(self, engine: Engine) -> None:
        try:
            self.result = _run(engine, self.job, self.streamer)
        finally:
            self.streamer.end()

    async def pieces(self, request: Request) -> AsyncIterator[str]:
        """The text as it is generated; a client that leaves cancels the job and ends the pieces."""
        iterator, done = iter(self.streamer), object()

        def next_piece():
            try:
                return next(iterator)
            except StopIteration:
                return done
            except queue.Empty:  # the streamer's short timeout: nothing new yet
                return None

        while True:
            if await request.is_disconnected():
                self.gone = True
                self.job.cancel.set()  # the generation stops at its next token and frees the slot
                return
            piece = await asyncio.to_thread(next_piece)
            if piece is done:
                return
            if piece:
                yield piece

    async def finished(self) -> _Result | None:
        await asyncio.to_thread(self.worker.join)
        return self.result


# ---------------------------------------------------------------------------------------
# vLLM

# vLLM sizes its LoRA buffers for one of these ranks and refuses any other --max-lora-rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank r."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise RecipeError(f"lora.r {r} is over the largest LoRA rank vLLM serves ({VLLM_LORA_RANKS[-1]}): merge it first")


def vllm_command(
    source: str | Path,
    *,
    host: str,
    port: int,
    name: str | None = None,
    api_key: str | None = None,
    max_tokens_limit: int = 1024,
) -> list[str]:
    """The ``vllm serve`` command for a run directory (base model + LoRA adapter), a merged model folder or
    a hub id. It writes nothing: ``--dry-run`` only prints it."""
    from .recipe import load_recipe
    from .source import Source

    src = Source.of(source)  # a missing path, an empty run folder or a foreign folder is refused, named
    path = Path(source)
    cmd = ["vllm", "serve"]
    if src.run is not None:
        recipe = load_recipe(src.run.recipe_file)
        if recipe.model.name_or_path.startswith("builtin:"):
            raise RecipeError("vLLM needs a hub id or a model folder: merge the tiny model first (codetune merge)")
        adapter = src.adapter
        lora_name = name or path.resolve().name
        config = json.loads(src.run.adapter_config.read_text())
        # the adapter's own ranks, per-module ones included, are what vLLM must hold
        rank = max([int(config.get("r") or recipe.lora.r), *map(int, (config.get("rank_pattern") or {}).values())])
        cmd += [recipe.model.name_or_path]
        if recipe.model.revision:
            cmd += ["--revision", recipe.model.revision]
        cmd += [
            "--enable-lora",
            "--lora-modules",
            f"{lora_name}={adapter.resolve()}",
            "--max-lora-rank",
            str(vllm_lora_rank(rank)),
            "--max-model-len",
            str(recipe.tokenizer.model_max_length or 4096),
        ]
        if recipe.tokenizer.chat_template:
            # training saved the tokenizer, with the recipe's template, next to the adapter
            template = adapter / "chat_template.jinja"
            if not template.is_file():
                raise RecipeError(
                    f"{template} is missing: the recipe names a chat template that vLLM would not know; "
                    "retrain, or merge the run and serve the merged folder"
                )
            cmd += ["--chat-template", str(template.resolve())]
    elif path.exists():
        if not (path / "config.json").is_file():
            raise RecipeError(f"{path} is neither a run directory (recipe.yaml) nor a model folder (config.json)")
        cmd += [str(path.resolve()), "--served-model-name", name or path.resolve().name]
    else:
        cmd += [str(source), "--served-model-name", name or path.name]
    cmd += ["--host", host, "--port", str(port), "--max-num-seqs", "64"]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd
