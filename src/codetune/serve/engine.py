"""The generation engine of ``codetune serve``: the loaded model and its one generation slot.

One model answers one request at a time: requests wait for the slot and are never dropped. A job
whose client has left stops at its next token (or before it gets the slot) and frees the slot.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from ..errors import InputError
from ..generate import first_stop
from ..recipe import GenerationConfig, Recipe
from .schema import APIError, ChatRequest, CompletionRequest, OpenAIRequest

log = logging.getLogger("codetune.serve")


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
        from ..generate import InferenceSession

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
    from ..generate import load_for_inference, quiet_libraries

    if max_tokens_limit < 1:  # a server that would refuse every request is refused before it loads anything
        raise InputError(f"--max-tokens-limit {max_tokens_limit}: must be at least 1")
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
class Job:
    prompt_ids: list[int]
    cfg: GenerationConfig
    stops: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)  # the client left
    enough: threading.Event = field(default_factory=threading.Event)  # the streamed answer hit a stop string


@dataclass
class Result:
    text: str
    completion_tokens: int
    reason: str  # "stop", "length" or "cancelled"


def _config(engine: Engine, req: OpenAIRequest) -> GenerationConfig:
    """The request's OpenAI parameters as the session's generation settings."""
    from ..generate import SettingsError

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


def _logit_bias(engine: Engine, req: OpenAIRequest) -> dict[int, float]:
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


def make_job(engine: Engine, req: ChatRequest | CompletionRequest) -> Job:
    """Check the request against the model (runs in a worker thread: templating and tokenizing take time)."""
    from ..generate import ContextError, TemplateRefused

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
    return Job(
        ids,
        cfg.model_copy(update={"max_new_tokens": limit}),
        stops=req.stops,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=_logit_bias(engine, req),
    )


def _halt_and_penalties(job: Job) -> tuple[list, list]:
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


def run_job(engine: Engine, job: Job, streamer=None) -> Result:
    """Generate for one job while holding the slot. A cancelled job (its client left) stops at the next token."""
    criteria, processors = _halt_and_penalties(job)
    # Wait for the slot, but give up as soon as the client has gone: a queue of abandoned requests
    # must not delay the next live one.
    while not engine.slot.acquire(timeout=0.05):
        if job.cancel.is_set():
            engine.count(cancelled=1)
            return Result("", 0, "cancelled")
    try:
        if job.cancel.is_set():
            engine.count(cancelled=1)
            return Result("", 0, "cancelled")
        answer = engine.session.complete(
            job.prompt_ids, job.cfg, stops=job.stops, streamer=streamer, criteria=criteria, processors=processors
        )
    finally:
        engine.slot.release()
    engine.count(requests=1, tokens=answer.tokens)
    if job.cancel.is_set():
        engine.count(cancelled=1)
        return Result("", answer.tokens, "cancelled")
    return Result(answer.text, answer.tokens, answer.reason)


# ---------------------------------------------------------------------------------------
# Streaming


class StopFilter:
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


class StreamedRun:
    """One job generating in a worker thread, its text read piece by piece as it comes."""

    def __init__(self, engine: Engine, job: Job):
        from transformers import TextIteratorStreamer

        self.job, self.result, self.gone = job, None, False
        self.streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.05)
        self.worker = threading.Thread(target=self._work, args=(engine,), daemon=True)
        self.worker.start()

    def _work(self, engine: Engine) -> None:
        try:
            self.result = run_job(engine, self.job, self.streamer)
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

    async def finished(self) -> Result | None:
        await asyncio.to_thread(self.worker.join)
        return self.result
