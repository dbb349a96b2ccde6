"""The FastAPI app of ``codetune serve``: the request guard, OpenAI-style errors and the API routes.

Request bodies over ``max_request_bytes`` get a 413 before they are read. Every request body is
parsed by the models of :mod:`codetune.serve.schema`, so a malformed request gets a 4xx with an
OpenAI-style error body, never a 5xx, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

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
DEFAULT_MAX_CONNECTIONS = 100
# uvicorn's own error logger: configured by uvicorn, printed as one line
log = logging.getLogger("uvicorn.error")


# ---------------------------------------------------------------------------------------
# Request guard: Host, API key, body size and body pace, as plain ASGI so that nothing reads the body first

DEFAULT_BODY_TIMEOUT = 30.0
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
# The pages carry their script's CSP in a <meta> tag, which cannot forbid framing; these headers can.
SECURITY_HEADERS = [
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def allowed_hosts_for(host: str, extra: list[str] | None = None) -> frozenset[str] | None:
    """The Host header values a server bound to ``host`` answers: its own address (every loopback name when
    it is a loopback one) and ``extra``. A DNS-rebinding page reaches the server under its attacker's name,
    so a request that names another host is refused. None (any Host) for a wildcard bind without ``extra``:
    such a server is reached by names it cannot know."""
    names = {h.strip("[]").lower() for h in extra or []}
    if host in WILDCARD_HOSTS:
        return frozenset(names) or None
    names.add(host.strip("[]").lower())
    if names & LOOPBACK_NAMES:
        names |= LOOPBACK_NAMES
    return frozenset(names)


def _host_name(value: str) -> str:
    """The name of a Host header without its port: ``[::1]:8000`` -> ``::1``, ``localhost:8000`` -> ``localhost``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _authorized(header: str, key: str) -> bool:
    """``Bearer KEY`` (API clients) or HTTP Basic with KEY as the password (a browser opening / or /chat)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), key.encode())
    if scheme.lower() == "basic":
        try:
            password = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), key.encode())
    return False


class _Guard:
    """In front of every route: security headers on every answer; a request naming another Host gets 421
    (DNS rebinding); without the API key every route but /health gets 401 (the pages ask the browser for
    it, HTTP Basic with the key as password); an oversized body gets 413 before it is read (by
    Content-Length, and by counting a chunked body's bytes as they arrive); a body that stalls for
    ``body_timeout`` seconds gets 408, so slow clients cannot hold connections open."""

    def __init__(
        self,
        app,
        *,
        max_bytes: int,
        api_key: str | None,
        allowed_hosts: frozenset[str] | None = None,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
    ):
        self.app, self.max_bytes, self.api_key = app, max_bytes, api_key
        self.allowed_hosts, self.body_timeout = allowed_hosts, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            return await _send_error(secured_send, *refusal)
        return await self.app(scope, self._paced(receive), secured_send)

    def _refusal(self, path: str, headers: dict[str, str]) -> tuple[APIError, list] | None:
        host = headers.get("host", "")
        if self.allowed_hosts is not None and _host_name(host) not in self.allowed_hosts:
            names = ", ".join(sorted(self.allowed_hosts))
            return APIError(421, f"Host {host!r} is not this server's address ({names}); see --allowed-host"), []
        if self.api_key and path != "/health" and not _authorized(headers.get("authorization", ""), self.api_key):
            err = APIError(
                401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key",
                type_="authentication_error",
            )  # fmt: skip
            # a person opening a page gets the browser's password prompt; the key is the password
            extra = [] if path.startswith("/v1/") else [(b"www-authenticate", b'Basic realm="codetune serve"')]
            return err, extra
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return APIError(400, f"Content-Length {length!r} is not a number"), []
            if int(length) > self.max_bytes:
                return self._too_large(), []
        return None

    def _paced(self, receive):
        """``receive`` that counts the body's bytes and bounds the wait for each piece of it; once the body
        is complete, waits (for a disconnect) are the app's and unbounded."""
        seen, complete = 0, False

        async def paced_receive():
            nonlocal seen, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                complete = True
                raise APIError(
                    408, f"the request body stalled for {self.body_timeout:g} s; send it whole", code="request_timeout"
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise self._too_large()  # answered by the app's APIError handler; the rest is never read
            else:
                complete = True
            return message

        return paced_receive

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body is over this server's limit of {self.max_bytes} bytes (--max-request-bytes)",
            code="request_too_large",
        )


async def _send_error(send, err: APIError, extra_headers: list | None = None) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": err.status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------
# The app


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    allowed_hosts: frozenset[str] | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
):
    """The FastAPI app: the guard in front, OpenAI-style errors, the API routes, and the pages for people.
    ``allowed_hosts`` (``allowed_hosts_for``) are the Host names it answers; None answers any."""
    from fastapi import FastAPI

    app = FastAPI(title="codetune", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        _Guard, max_bytes=max_request_bytes, api_key=api_key, allowed_hosts=allowed_hosts, body_timeout=body_timeout
    )
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
        # JSON only, and said so: a cross-site form or a Content-Type-less "simple request" can start nothing
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            got = f"Content-Type {ctype!r}" if ctype else "no Content-Type"
            raise APIError(415, f"{got}: the request body must be JSON (Content-Type: application/json)")
        try:
            raw = await request.body()  # bounded in size and pace by _Guard
        except ClientDisconnect:
            log.warning("a client left before sending its whole request body (%s)", request.url.path)
            raise APIError(400, "the client left before sending its whole request body") from None
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


# ---------------------------------------------------------------------------------------
# Serving: bind first, so that a port in use or a bad address is an error before anything is announced


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or an InputError naming the option that cannot be used."""
    from ..errors import InputError

    try:
        family, type_, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"--host {host!r}: not an address to listen on ({reason})") from None
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = "; another process listens there: choose another --port" if exc.errno == errno.EADDRINUSE else ""
        raise InputError(f"--host {host} --port {port}: {exc.strerror or exc}{hint}") from None
    sock.set_inheritable(True)
    return sock


def run_server(app, sock: socket.socket, *, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
    """Serve ``app`` on a socket from ``bind`` until Ctrl-C. Past ``max_connections`` open connections a new
    request gets a 503 at once rather than a place in line."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", limit_concurrency=max_connections, timeout_keep_alive=5)
    uvicorn.Server(config).run(sockets=[sock])
