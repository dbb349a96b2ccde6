"""The FastAPI app of ``codetune serve``: the request guard, OpenAI-style errors and the API routes.

Request bodies over ``max_request_bytes`` get a 413 before they are read. Every request body is
parsed by the models of :mod:`codetune.serve.schema`, so a malformed request gets a 4xx with an
OpenAI-style error body, never a 5xx, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from pydantic import BaseModel, ValidationError

from .engine import Engine, Job, Result, StopFilter, StreamedRun, make_job, run_job
from .pages import add_pages
from .schema import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    Health,
    ModelCard,
    ModelList,
    OpenAIRequest,
    Usage,
    invalid_request,
)

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


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

    async def _parse(self, request: Request, schema: type[OpenAIRequest]) -> OpenAIRequest:
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
            raise invalid_request(exc) from None
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

    async def _complete(self, request: Request, schema: type[OpenAIRequest], kind: str):
        from fastapi.responses import JSONResponse, StreamingResponse

        req = await self._parse(request, schema)
        job = await asyncio.to_thread(make_job, self.engine, req)
        reply = _Reply(kind, self.engine.name, len(job.prompt_ids))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._events(request, job, reply, include_usage), media_type="text/event-stream")
        result = await self._until_done_or_gone(request, job)
        if result.reason == "cancelled":
            # nobody is there to read it; nginx's "client closed request", so a log shows what happened
            return JSONResponse(APIError(499, "the client closed the request").body(), status_code=499)
        return JSONResponse(reply.whole(result).model_dump(mode="json"))

    async def _until_done_or_gone(self, request: Request, job: Job) -> Result:
        """Generate in a worker thread while watching the connection: a client that left cancels its job."""
        task = asyncio.ensure_future(asyncio.to_thread(run_job, self.engine, job))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.1)
                if not task.done() and await request.is_disconnected():
                    job.cancel.set()
            return task.result()
        except asyncio.CancelledError:
            job.cancel.set()
            raise

    async def _events(self, request: Request, job: Job, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer, stop strings held back until they are ruled out."""
        generation = StreamedRun(self.engine, job)
        stop_filter = StopFilter(job.stops)
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

    def whole(self, result: Result) -> ChatCompletion | Completion:
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
