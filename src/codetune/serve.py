"""``codetune serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a run or a merged model.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (both streamed with server-sent events when ``stream`` is true), and two
pages for people: the run report at ``GET /`` and a chat page at ``GET /chat``.

One model answers one request at a time: requests wait in a queue for the generation slot and are
never dropped. A streaming client that disconnects stops its generation at the next token and
frees the slot. Bad requests get a 4xx with an OpenAI-style error body and the server keeps
serving. For more than one machine's worth of traffic, ``--engine vllm`` hands the same model and
adapter to vLLM's own OpenAI server instead.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .recipe import GenerationConfig, Recipe, RecipeError


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
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    seed: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str


@dataclass
class Engine:
    """The loaded model, its tokenizer and recipe, and the one generation slot."""

    model: Any
    tokenizer: Any
    recipe: Recipe
    name: str
    max_tokens_limit: int
    source: str | None = None  # the run directory or model it was loaded from (the report at / reads it)

    def __post_init__(self):
        self.slot = threading.Lock()

    @property
    def context(self) -> int:
        from .generate import context_length

        return context_length(self.model)


def load_engine(
    source: str | Path, *, name: str | None = None, max_tokens_limit: int = 1024, recipe: Recipe | None = None
) -> Engine:
    from .generate import load_for_inference

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
    cancel: threading.Event


def _config(engine: Engine, req: _Request) -> GenerationConfig:
    max_tokens = req.max_completion_tokens or req.max_tokens or engine.recipe.generation.max_new_tokens
    if max_tokens > engine.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens {max_tokens} is over this server's limit of {engine.max_tokens_limit}",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    data = engine.recipe.generation.model_dump()
    data["max_new_tokens"] = max_tokens
    if req.temperature is not None:  # OpenAI's temperature 0 means greedy
        data["do_sample"] = req.temperature > 0
        if req.temperature > 0:
            data["temperature"] = req.temperature
    if req.top_p is not None:
        data["top_p"] = req.top_p
    if req.seed is not None:
        data["seed"] = req.seed
    return GenerationConfig.model_validate(data)


def _prompt_ids(engine: Engine, req: ChatRequest | CompletionRequest, cfg: GenerationConfig) -> list[int]:
    tok = engine.tokenizer
    if isinstance(req, ChatRequest):
        text = tok.apply_chat_template(
            [m.model_dump() for m in req.messages], tokenize=False, add_generation_prompt=True
        )
    else:
        text = req.prompt
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(ids) + cfg.max_new_tokens > engine.context:
        raise APIError(
            400,
            f"the prompt has {len(ids)} tokens; with max_tokens {cfg.max_new_tokens} that is over "
            f"the model's context of {engine.context} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    return ids


def _run(engine: Engine, job: _Job, streamer=None) -> tuple[list[int], str]:
    """Generate for one job while holding the slot; returns (new token ids, finish reason)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from .generate import _sampling
    from .model import stop_token_ids

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), job.cancel.is_set(), dtype=torch.bool)

    stops = stop_token_ids(engine.tokenizer, job.cfg.stop_tokens)
    with engine.slot:
        if job.cancel.is_set():
            return [], "cancelled"
        torch.manual_seed(job.cfg.seed)
        input_ids = torch.tensor([job.prompt_ids], device=engine.model.device)
        with torch.inference_mode():
            out = engine.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                **_sampling(job.cfg),
                eos_token_id=stops,
                pad_token_id=engine.tokenizer.pad_token_id,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([Cancelled()]),
            )
    new = out[0, len(job.prompt_ids) :].tolist()
    if new and new[-1] in stops:
        return new[:-1], "stop"
    return new, "length" if len(new) >= job.cfg.max_new_tokens else "stop"


# ---------------------------------------------------------------------------------------
# The app


def create_app(engine: Engine, *, api_key: str | None = None):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="codetune", version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return JSONResponse(APIError(400, err["msg"], param=".".join(str(p) for p in err["loc"][1:])).body(), 400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                err = APIError(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    code="invalid_api_key",
                    type_="authentication_error",
                )
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    async def _parse(request: Request, schema: type[_Request]) -> _Request:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        try:
            req = schema.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise APIError(
                400, f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}", param=".".join(str(p) for p in err["loc"])
            ) from None
        if req.model != engine.name:
            raise APIError(
                404,
                f"the model {req.model!r} does not exist; this server has {engine.name!r}",
                param="model",
                code="model_not_found",
            )
        return req

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "codetune"}],
        }

    async def _complete(request: Request, schema: type[_Request], kind: str):
        req = await _parse(request, schema)
        try:
            cfg = _config(engine, req)
        except ValidationError as exc:
            raise APIError(400, exc.errors()[0]["msg"]) from None
        job = _Job(_prompt_ids(engine, req, cfg), cfg, threading.Event())
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if req.stream:
            return StreamingResponse(_stream(request, job, rid, created, kind), media_type="text/event-stream")
        try:
            ids, reason = await asyncio.to_thread(_run, engine, job)
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        usage = {
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": len(ids),
            "total_tokens": len(job.prompt_ids) + len(ids),
        }
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": None,
            }
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": engine.name,
                "choices": [choice],
                "usage": usage,
            }
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": engine.name,
            "choices": [choice],
            "usage": usage,
        }

    async def _stream(request: Request, job: _Job, rid: str, created: int, kind: str) -> AsyncIterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.05)
        result: dict[str, Any] = {}

        def work():
            try:
                result["ids"], result["reason"] = _run(engine, job, streamer)
            finally:
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()

        def chunk(delta: str | None, reason: str | None = None, first: bool = False) -> str:
            if kind == "chat":
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
                obj = "text_completion"
            return (
                "data: "
                + json.dumps({"id": rid, "object": obj, "created": created, "model": engine.name, "choices": [choice]})
                + "\n\n"
            )

        try:
            if kind == "chat":
                yield chunk(None, first=True)
            iterator = iter(streamer)
            done = object()

            def next_piece():
                try:
                    return next(iterator)
                except StopIteration:
                    return done
                except queue.Empty:  # the streamer's short timeout: nothing new yet
                    return None

            while True:
                if await request.is_disconnected():
                    job.cancel.set()  # the generation stops at its next token and frees the slot
                    return
                piece = await asyncio.to_thread(next_piece)
                if piece is done:
                    break
                if piece:
                    yield chunk(piece)
            await asyncio.to_thread(worker.join)
            yield chunk(None, result.get("reason", "stop"))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, ChatRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, CompletionRequest, "text")

    # The run report at / and a chat page at /chat (codetune.report)
    from .report import add_pages

    add_pages(app, engine, engine.source, auth=bool(api_key))

    return app


# ---------------------------------------------------------------------------------------
# vLLM


def vllm_command(
    source: str | Path,
    *,
    host: str,
    port: int,
    name: str | None = None,
    api_key: str | None = None,
    max_tokens_limit: int = 1024,
) -> list[str]:
    """The ``vllm serve`` command for a run directory (base model + LoRA adapter) or a merged model."""
    from .recipe import load_recipe
    from .train import ADAPTER

    from .generate import check_source

    check_source(source)
    path = Path(source)
    cmd = ["vllm", "serve"]
    if (path / "recipe.yaml").is_file():
        recipe = load_recipe(path / "recipe.yaml")
        if recipe.model.name_or_path.startswith("builtin:"):
            raise RecipeError("vLLM needs a hub id or a model folder: merge the tiny model first (codetune merge)")
        adapter = path / ADAPTER
        if not (adapter / "adapter_config.json").is_file():
            raise RecipeError(f"{path} has no trained adapter ({adapter} is missing)")
        lora_name = name or path.name
        cmd += [recipe.model.name_or_path]
        if recipe.model.revision:
            cmd += ["--revision", recipe.model.revision]
        cmd += [
            "--enable-lora",
            "--lora-modules",
            f"{lora_name}={adapter.resolve()}",
            "--max-lora-rank",
            str(max(8, recipe.lora.r)),
            "--max-model-len",
            str(recipe.tokenizer.model_max_length or 4096),
        ]
        if recipe.tokenizer.chat_template:
            from .templates import resolve_template

            template = path / "chat_template.jinja"
            template.write_text(resolve_template(recipe.tokenizer.chat_template) or "")
            cmd += ["--chat-template", str(template.resolve())]
    else:
        cmd += [str(source), "--served-model-name", name or path.name or str(source)]
    cmd += ["--host", host, "--port", str(port), "--max-num-seqs", "64"]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd
