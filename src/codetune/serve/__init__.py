"""``codetune serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a run or a merged model.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (both streamed with server-sent events when ``stream`` is true), and two
pages for people: the run report at ``GET /`` and a chat page at ``GET /chat``.

One model answers one request at a time: requests wait in a queue for the generation slot and are
never dropped. A client that disconnects, streaming or not, stops its generation at the next token
and frees the slot. Request bodies over ``max_request_bytes`` get a 413 before they are read. Every
request body is parsed by pydantic models (strict types, unknown parameters refused), so a malformed
request gets a 4xx with an OpenAI-style error body, never a 5xx, and the server keeps serving. For
more than one machine's worth of traffic, ``--engine vllm`` hands the same model and adapter to
vLLM's own OpenAI server instead.

The modules, by concern:

- ``schema``: the OpenAI request and response bodies, and ``APIError`` (an error in OpenAI's shape);
- ``engine``: the loaded model, its one generation slot, and the generation of one request;
- ``app``: the FastAPI app (``create_app``): the request guard, the error handlers, the API routes;
- ``pages``: the pages for people, the run report at ``/`` and the chat page at ``/chat``
  (``chat.html``, ``chat.css``, ``chat.js``: package data);
- ``vllm``: the ``vllm serve`` command of ``--engine vllm``.
"""

from __future__ import annotations

from .app import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_REQUEST_BYTES, allowed_hosts_for, bind, create_app, run_server
from .engine import Engine, load_engine
from .pages import add_pages, chat_page, no_report_page
from .schema import APIError, ChatRequest, CompletionRequest
from .vllm import VLLM_LORA_RANKS, find_vllm, vllm_command, vllm_lora_rank

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_REQUEST_BYTES",
    "VLLM_LORA_RANKS",
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "Engine",
    "add_pages",
    "allowed_hosts_for",
    "bind",
    "chat_page",
    "create_app",
    "find_vllm",
    "load_engine",
    "no_report_page",
    "run_server",
    "vllm_command",
    "vllm_lora_rank",
]
