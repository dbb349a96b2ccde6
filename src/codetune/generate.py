"""Generation from a run directory (base + adapter), a merged model folder or a hub id.

Every entry point (eval, ``codetune generate`` / ``chat``, the Python API below and ``codetune
serve``) answers through one :class:`InferenceSession`: prompts are rendered with the recipe's chat
template, batched with left padding and the KV cache, and stop on every stop token of the recipe
(``<|end|>`` as well as end-of-text).

    import codetune
    coder = codetune.load("runs/tiny-cpu")
    print(coder.generate("Write a function add(a, b) that returns a + b."))
    print(coder.chat([{"role": "user", "content": "..."}]))
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from .model import (
    disable_avx512_bf16_path,
    load_adapter,
    load_base_model,
    load_tokenizer,
    merged_model,
    stop_token_ids,
)
from .recipe import GenerationConfig, Recipe, RecipeError, format_validation_error
from .source import Source


class ContextError(RecipeError):
    """A prompt that leaves no room for an answer within the model's context."""


class ContextWarning(UserWarning):
    """max_new_tokens was cut so that prompt + answer fit the model's context."""


@dataclass
class Loaded:
    model: object
    tokenizer: object
    recipe: Recipe


def load_for_inference(
    source: str | Path | Source, *, recipe: Recipe | None = None, merged: bool = False
) -> Loaded:
    """A run directory (its recipe's base model plus ``adapter/``), or anything ``from_pretrained`` takes.

    ``merged``: for a run directory, the adapter merged into the unquantized base in the compute dtype
    (as the reference notebook evaluated) instead of the 4-bit base with the adapter on top. The libraries'
    loading bars and notices are silenced while it loads (``quiet_libraries``).
    """
    src = Source.of(source)
    recipe = src.model_recipe(recipe or src.recipe())
    with quiet_libraries():
        return _load_model(src, recipe, merged)


def _load_model(src: Source, recipe: Recipe, merged: bool) -> Loaded:
    if src.run is not None:
        adapter = src.adapter
        if merged:
            import torch

            # unquantized weights stay where they load; the 4-bit path is placed on the GPU by bitsandbytes
            model = merged_model(recipe, adapter, device_map={"": 0} if torch.cuda.is_available() else None)
        else:
            model = load_adapter(load_base_model(recipe), adapter, recipe)
    else:
        model = load_base_model(recipe)
    tokenizer = load_tokenizer(recipe)
    disable_avx512_bf16_path(model)
    model.eval()
    return Loaded(model, tokenizer, recipe)


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0) or 4096


def fit_to_context(
    prompt_lengths: list[int],
    max_new_tokens: int,
    context: int,
    *,
    what: str = "prompt",
    warn: Callable[[str], None] | None = None,
) -> list[int]:
    """How many new tokens each prompt may have so that prompt + answer fit in ``context`` tokens.

    The one rule for generate, chat, eval and serve: a prompt that leaves no room for a single new
    token is refused (ContextError, naming the prompt); otherwise ``max_new_tokens`` is cut to the
    room left, with one ContextWarning for all the prompts that were cut (or one call of ``warn``, for a
    server that logs it). Generating past the context gives garbage or an index error, depending on
    the model.
    """
    limits = []
    for i, n in enumerate(prompt_lengths):
        room = context - n
        if room < 1:
            name = what if len(prompt_lengths) == 1 else f"{what} {i}"
            raise ContextError(
                f"{name} has {n} tokens: the model's context is {context} tokens, which leaves no room for an "
                "answer; shorten it"
            )
        limits.append(min(max_new_tokens, room))
    cut = [i for i, lim in enumerate(limits) if lim < max_new_tokens]
    if cut:
        first = cut[0]
        if len(prompt_lengths) == 1:
            name = what
        elif len(cut) == 1:
            name = f"{what} {first}"
        else:
            name = f"{len(cut)} {what}s, e.g. {what} {first}"
        message = (
            f"{name} ({prompt_lengths[first]} tokens): max_new_tokens cut from {max_new_tokens} to "
            f"{limits[first]} to fit the model's context of {context} tokens"
        )
        if warn is not None:
            warn(message)
        else:
            warnings.warn(message, ContextWarning, stacklevel=2)
    return limits


# Below this a sample is the argmax anyway, and under ~1e-36 the scaled logits overflow to inf (a crash
# in torch.multinomial): such temperatures decode greedily, as 0 does.
GREEDY_BELOW = 1e-6


class SettingsError(RecipeError):
    """Generation settings out of range (``temperature=-1``); ``param`` and ``detail`` name the first one."""

    def __init__(self, exc: ValidationError):
        super().__init__(format_validation_error(exc, "generation settings"))
        err = exc.errors()[0]
        self.param, self.detail = ".".join(str(p) for p in err["loc"]), err["msg"]


class TemplateRefused(RecipeError):
    """A conversation the chat template raises on (an order of roles it does not take, say)."""


@dataclass
class Answer:
    """One prompt's outcome from :meth:`InferenceSession.complete`."""

    text: str  # decoded, stop token and stop strings cut off, not stripped
    tokens: int  # tokens generated, the stop token included (what a server bills)
    reason: str  # "stop" (a stop token or string) or "length"


def _sampling(cfg: GenerationConfig) -> dict:
    sample = cfg.do_sample and cfg.temperature >= GREEDY_BELOW  # 0 is greedy, however the config was built
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p) if sample else {}
    return dict(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=sample,
        num_beams=cfg.num_beams,
        repetition_penalty=cfg.repetition_penalty,
        **sampling,
    )


def _chat_prompt_ids(tokenizer, conversation: list[dict], what: str = "messages") -> list[int]:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # a template may refuse an order of roles (e.g. two system turns)
        raise TemplateRefused(f"{what}: the chat template refused them: {exc}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prompt_ids(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    return [_chat_prompt_ids(tokenizer, conv) for conv in conversations]


def _left_padded(rows: list[list[int]], pad_id: int, device):
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def clean_up_tokenization(text: str) -> str:
    """transformers 4.40's ``clean_up_tokenization``: the spaces before punctuation and English contractions
    that its text-generation pipeline removed (``clean_up_tokenization_spaces=True``). transformers 5.24 no
    longer applies it to BPE tokenizers such as Phi-3's, so codetune does, when the recipe asks."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(spaced, joined)
    return text


def first_stop(text: str, stops: list[str]) -> int:
    """Where the earliest stop string starts in text, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def _stop_text_criterion(tokenizer, n_prompt: int, stops: list[str]):
    from transformers import StoppingCriteria

    class StopText(StoppingCriteria):
        # Each token is at least one character, or up to 4 byte-pieces of one: this tail holds any stop string.
        tail = 4 * max(len(s) for s in stops) + 8

        def __call__(self, input_ids, scores, **kwargs):
            import torch

            new = input_ids[0, max(n_prompt, input_ids.shape[1] - self.tail) :].tolist()
            hit = first_stop(tokenizer.decode(new, skip_special_tokens=True), stops) >= 0
            return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)

    return StopText()


class InferenceSession:
    """One loaded model ready to answer, shared by eval, ``codetune generate`` / ``chat``, the Python API
    and the server, so that they cannot drift apart.

    Worked out once: the stop token ids of the recipe's ``generation.stop_tokens`` (a family's end of
    turn as well as its eos), the pad id, the model's context length, and the default generation
    settings with their seed. Every method takes those defaults or a config from :meth:`config`;
    temperature 0 decodes greedily in all of them, and each seeds torch with the config's seed first,
    so a sampled answer is the same for the same seed.
    """

    def __init__(self, model, tokenizer, defaults: GenerationConfig, *, batch_size: int = 16):
        self.model, self.tokenizer, self.defaults, self.batch_size = model, tokenizer, defaults, batch_size
        self.pad_id = tokenizer.pad_token_id
        self.context = context_length(model)
        self._stop_ids: dict[tuple[str, ...], list[int]] = {}
        self.stop_ids = self.stop_ids_for(defaults)  # a stop token the tokenizer lacks fails here, before any work

    @classmethod
    def from_loaded(cls, loaded: Loaded, *, model=None) -> InferenceSession:
        """The session of a loaded run or model; ``model``: another model with the same tokenizer (eval's base)."""
        return cls(
            loaded.model if model is None else model,
            loaded.tokenizer,
            loaded.recipe.generation,
            batch_size=loaded.recipe.evaluation.batch_size,
        )

    def stop_ids_for(self, cfg: GenerationConfig) -> list[int]:

        key = tuple(cfg.stop_tokens)
        if key not in self._stop_ids:
            self._stop_ids[key] = stop_token_ids(self.tokenizer, list(key))
        return self._stop_ids[key]

    def config(self, **overrides) -> GenerationConfig:
        """The defaults with ``overrides`` (``temperature=0.7``, ``max_new_tokens=64``), checked like a recipe."""
        if not overrides:
            return self.defaults
        try:  # out-of-range sampling parameters fail here, naming the field
            cfg = GenerationConfig.model_validate({**self.defaults.model_dump(), **overrides})
        except ValidationError as exc:
            raise SettingsError(exc) from None
        self.stop_ids_for(cfg)
        return cfg

    def prompt_ids(self, conversation: list[dict], *, what: str = "messages") -> list[int]:
        """The token ids of a conversation rendered by the chat template, ready for the assistant's turn."""
        return _chat_prompt_ids(self.tokenizer, conversation, what)

    def encode(self, text: str) -> list[int]:
        """The token ids of a raw prompt, no template and no special tokens added."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def fit(self, prompt_lengths: list[int], cfg: GenerationConfig, *, what: str = "prompt", warn=None) -> list[int]:
        """``max_new_tokens`` for each prompt within the context (:func:`fit_to_context`)."""
        return fit_to_context(prompt_lengths, cfg.max_new_tokens, self.context, what=what, warn=warn)

    def generate(
        self,
        conversations: list[list[dict]],
        cfg: GenerationConfig | None = None,
        *,
        batch_size: int | None = None,
        on_batch: Callable[[int], None] | None = None,
        first_wave: int | None = 32,
    ) -> list[str]:
        """Batched generation: one answer (the text after the prompt, stripped) per conversation.

        Each batch is left-padded and decoded with the KV cache by ``model.generate``. A batch runs in
        *waves* of new tokens (32, then 64, 128, ...): after each wave the rows that hit a stop token
        leave, and the rest go on together from where they stopped. Without waves one long answer keeps
        a whole batch busy until it ends. ``first_wave=None`` decodes each batch in one call.
        """
        import torch

        cfg = cfg or self.defaults
        batch_size = batch_size or self.batch_size
        what = "messages" if len(conversations) == 1 else "conversation {}"
        all_prompts = [self.prompt_ids(c, what=what.format(i)) for i, c in enumerate(conversations)]
        limits = self.fit([len(p) for p in all_prompts], cfg)
        torch.manual_seed(cfg.seed)
        # Batches of similar prompt lengths carry less padding; answers go back in the caller's order.
        order = sorted(range(len(all_prompts)), key=lambda i: len(all_prompts[i]))
        answers: list[str] = [""] * len(all_prompts)
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            new = self._batch([all_prompts[i] for i in chosen], [limits[i] for i in chosen], cfg, first_wave)
            for i, ids in zip(chosen, new, strict=True):
                answers[i] = self.answer_text(all_prompts[i], ids, cfg)
            if on_batch is not None:
                on_batch(len(chosen))
        return answers

    def answer_text(self, prompt_ids: list[int], new_ids: list[int], cfg: GenerationConfig) -> str:
        """An answer as text, stripped: its ids decoded without special tokens. With
        ``generation.clean_up_tokenization_spaces``, as transformers 4.40's text-generation pipeline made it:
        prompt and answer decoded together and cleaned up, then cut after the cleaned-up prompt's length."""
        if not cfg.clean_up_tokenization_spaces:
            return self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        whole = clean_up_tokenization(self.tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True))
        prompt = clean_up_tokenization(self.tokenizer.decode(prompt_ids, skip_special_tokens=True))
        return whole[len(prompt) :].strip()

    def generate_in_order(
        self,
        conversations: list[list[dict]],
        cfg: GenerationConfig | None = None,
        *,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[str]:
        """The reference notebook's evaluation, draw for draw: ``transformers.set_seed(cfg.seed)``, one warm-up
        generation of the first prompt (sampled like the rest, its answer dropped: the notebook's cell 72), then
        every prompt in the order given, one at a time, each in a single ``generate`` call without padding.
        Slow: no batching, no waves, and one generation more than there are prompts."""
        from transformers import set_seed

        cfg = cfg or self.defaults
        what = "messages" if len(conversations) == 1 else "conversation {}"
        prompts = [self.prompt_ids(c, what=what.format(i)) for i, c in enumerate(conversations)]
        limits = self.fit([len(p) for p in prompts], cfg)
        set_seed(cfg.seed)
        answers: list[str] = []
        if prompts:
            self._one(prompts[0], limits[0], cfg)
        for ids, limit in zip(prompts, limits, strict=True):
            answers.append(self.answer_text(ids, self._one(ids, limit, cfg), cfg))
            if on_batch is not None:
                on_batch(1)
        return answers

    def _one(self, prompt: list[int], limit: int, cfg: GenerationConfig) -> list[int]:
        """One prompt's new token ids from a single ``generate`` call, cut at its first stop token."""
        import torch

        stops = self.stop_ids_for(cfg)
        input_ids = torch.tensor([prompt], device=self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                **{**_sampling(cfg), "max_new_tokens": limit},
                eos_token_id=stops,
                pad_token_id=self.pad_id,
            )
        new = out[0, len(prompt) :].tolist()
        return next((new[:j] for j, t in enumerate(new) if t in stops), new)

    def completion_ids(
        self, prompts: list[list[int]], cfg: GenerationConfig | None = None, *, first_wave: int | None = 32
    ) -> list[list[int]]:
        """Each prompt's new token ids, batched as :meth:`generate` batches (sorted by length, in waves), each
        ending with the stop token that ended it (none when cut at the limit): what an RL trainer scores and
        trains on, the stop token included, so that a finished completion is told from a truncated one."""
        import torch

        cfg = cfg or self.defaults
        limits = self.fit([len(p) for p in prompts], cfg)
        torch.manual_seed(cfg.seed)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            new = self._batch([prompts[i] for i in chosen], [limits[i] for i in chosen], cfg, first_wave, keep_stop=True)
            for i, ids in zip(chosen, new, strict=True):
                out[i] = ids
        return out

    def _batch(
        self,
        prompts: list[list[int]],
        limit: list[int],
        cfg: GenerationConfig,
        first_wave: int | None,
        *,
        keep_stop: bool = False,
    ) -> list[list[int]]:
        """The new token ids of one batch, in waves, each row cut at its first stop token (kept with
        ``keep_stop``) and its limit."""
        import torch

        stops = set(self.stop_ids_for(cfg))
        new: list[list[int]] = [[] for _ in prompts]
        pending = list(range(len(prompts)))
        wave = first_wave or max(limit)
        while pending:
            # pending rows have all generated the same count; the one nearest the context ends this wave, so no
            # row is ever run past the context (and rows with the same limit see the waves they always did)
            step = min(wave, min(limit[i] - len(new[i]) for i in pending))
            enc = _left_padded([prompts[i] + new[i] for i in pending], self.pad_id, self.model.device)
            with torch.inference_mode():
                out = self.model.generate(
                    **enc,
                    **{**_sampling(cfg), "max_new_tokens": step},
                    # On a CPU a preallocated cache beats growing one by concatenation every step; on a GPU
                    # transformers would compile for it, once per wave shape, which costs more than it saves.
                    cache_implementation="static" if self.model.device.type == "cpu" else None,
                    eos_token_id=sorted(stops),
                    pad_token_id=self.pad_id,
                )
            still = []
            for row, i in zip(out[:, enc["input_ids"].shape[1] :].tolist(), pending, strict=True):
                cut = next((j for j, t in enumerate(row) if t in stops), None)
                # a row whose context is nearly full stops at its own limit even when the batch goes on
                new[i] = (new[i] + (row if cut is None else row[: cut + keep_stop]))[: limit[i]]
                if cut is None and len(row) == step and len(new[i]) < limit[i]:
                    still.append(i)
            wave *= 2
            pending = still
        return new

    def complete(
        self,
        prompt_ids: list[int],
        cfg: GenerationConfig | None = None,
        *,
        stops: list[str] | tuple[str, ...] = (),
        streamer=None,
        criteria: list | tuple = (),
        processors: list | tuple = (),
    ) -> Answer:
        """One prompt's answer, up to ``cfg.max_new_tokens`` (callers fit it to the context first, with
        :meth:`fit`, to warn in their own way; past the context it is cut here all the same).

        ``stops``: stop strings, besides the stop tokens; the answer ends before the first. ``streamer``
        gets the text as it is generated; ``criteria`` and ``processors``: more transformers stopping
        criteria and logits processors (a server's cancellation, penalties).
        """
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        cfg = cfg or self.defaults
        stops = list(stops)
        stop_ids = self.stop_ids_for(cfg)
        n_prompt = len(prompt_ids)
        limit = min(cfg.max_new_tokens, self.context - n_prompt)
        if limit < 1:
            self.fit([n_prompt], cfg)  # raises the one ContextError message
        halt = [*criteria, *([_stop_text_criterion(self.tokenizer, n_prompt, stops)] if stops else [])]
        torch.manual_seed(cfg.seed)
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                **{**_sampling(cfg), "max_new_tokens": limit},
                eos_token_id=stop_ids,
                pad_token_id=self.pad_id,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList(halt),
                logits_processor=LogitsProcessorList(processors),
            )
        new = out[0, n_prompt:].tolist()
        tokens = len(new)
        reason = "length" if tokens >= limit else "stop"
        if new and new[-1] in stop_ids:
            new, reason = new[:-1], "stop"
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        if cfg.clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        cut = first_stop(text, stops)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        return Answer(text, tokens, reason)

    def stream(self, conversation: list[dict], cfg: GenerationConfig | None = None) -> Iterator[str]:
        """Yield the answer's text as it is generated (for chat)."""
        from threading import Thread

        from transformers import TextIteratorStreamer

        cfg = cfg or self.defaults
        ids = self.prompt_ids(conversation)
        (limit,) = self.fit([len(ids)], cfg)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failed: list[BaseException] = []

        def work():
            try:
                self.complete(ids, cfg.model_copy(update={"max_new_tokens": limit}), streamer=streamer)
            except BaseException as exc:  # reported to the reader below, instead of leaving it waiting forever
                failed.append(exc)
                streamer.end()

        worker = Thread(target=work, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failed:
            raise failed[0]


def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    cfg: GenerationConfig,
    *,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    first_wave: int | None = 32,
) -> list[str]:
    """:meth:`InferenceSession.generate` for a model and tokenizer at hand (tests, benchmarks)."""
    session = InferenceSession(model, tokenizer, cfg, batch_size=batch_size)
    return session.generate(conversations, on_batch=on_batch, first_wave=first_wave)


def stream(model, tokenizer, conversation: list[dict], cfg: GenerationConfig) -> Iterator[str]:
    """:meth:`InferenceSession.stream` for a model and tokenizer at hand."""
    return InferenceSession(model, tokenizer, cfg).stream(conversation)


@contextlib.contextmanager
def quiet_libraries():
    """Silence the libraries' load-time chatter (transformers' weight-loading bar and notices, bitsandbytes'
    kernel notice, deprecation warnings) for the Python API, then restore every setting as it was.

    codetune's own warnings (a ContextWarning, say) still show: they are about the caller's input.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    bnb = logging.getLogger("bitsandbytes")
    saved = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), bnb.level)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    bnb.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|bitsandbytes|torch)")
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        hf_logging.set_verbosity(saved[0])
        if saved[1]:
            hf_logging.enable_progress_bar()
        if not saved[2]:
            enable_progress_bars()
        bnb.setLevel(saved[3])


class Coder:
    """The Python API: ``codetune.load(source)`` returns one. Keyword arguments of its methods override the
    recipe's generation settings for that call (``max_new_tokens=64``, ``temperature=0``, ``seed=7``)."""

    def __init__(self, loaded: Loaded):
        self.model, self.tokenizer, self.recipe = loaded.model, loaded.tokenizer, loaded.recipe
        self.session = InferenceSession.from_loaded(loaded)

    def generate(self, prompt: str | list[str], **overrides) -> str | list[str]:
        """Answer one prompt (a string) or several (a list), each as a single user turn."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        cfg = self.session.config(**overrides)
        with quiet_libraries():
            answers = self.session.generate([[{"role": "user", "content": p}] for p in prompts], cfg)
        return answers[0] if isinstance(prompt, str) else answers

    def chat(self, messages: list[dict], **overrides) -> str:
        """The assistant's next turn for a conversation of {role, content} messages."""
        cfg = self.session.config(**overrides)
        with quiet_libraries():
            return self.session.generate([messages], cfg)[0]

    def stream(self, messages: list[dict], **overrides) -> Iterator[str]:
        # not wrapped in quiet_libraries: its settings are process-wide and a generator may be left half-read
        return self.session.stream(messages, self.session.config(**overrides))


def load_session(source: str | Path, *, recipe: Recipe | None = None, merged: bool = False) -> InferenceSession:
    """:func:`load_for_inference`'s model as a session (the generate and chat commands)."""
    return InferenceSession.from_loaded(load_for_inference(source, recipe=recipe, merged=merged))


def load(source: str | Path, **recipe_overrides) -> Coder:
    """Load a run directory, merged model folder or hub id for generation, without the libraries' chatter."""
    src = Source.of(source)
    items = [f"{k.replace('__', '.')}={v}" for k, v in recipe_overrides.items()]
    recipe = src.recipe(overrides=items) if items else None
    with quiet_libraries():
        return Coder(load_for_inference(src, recipe=recipe))
