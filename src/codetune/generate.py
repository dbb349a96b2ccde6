"""Generation from a run directory (base + adapter), a merged model folder or a hub id.

Prompts are rendered with the recipe's chat template, batched with left padding and the KV
cache, and stop on every stop token of the recipe (``<|end|>`` as well as end-of-text).

    import codetune
    coder = codetune.load("runs/tiny-cpu")
    print(coder.generate("Write a function add(a, b) that returns a + b."))
    print(coder.chat([{"role": "user", "content": "..."}]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .recipe import GenerationConfig, Recipe, RecipeError, load_recipe


@dataclass
class Loaded:
    model: object
    tokenizer: object
    recipe: Recipe


def load_for_inference(source: str | Path, *, recipe: Recipe | None = None) -> Loaded:
    """A run directory (its recipe's base model plus ``adapter/``), or anything ``from_pretrained`` takes."""
    from .model import disable_avx512_bf16_path, load_base_model, load_tokenizer
    from .train import ADAPTER

    path = Path(source)
    if (path / "recipe.yaml").is_file():
        recipe = recipe or load_recipe(path / "recipe.yaml")
        adapter = path / ADAPTER
        if not (adapter / "adapter_config.json").is_file():
            raise RecipeError(f"{path} has no trained adapter ({adapter} is missing): run `codetune train` first")
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base_model(recipe), str(adapter))
    else:
        if path.exists() and not (path / "config.json").is_file():
            raise RecipeError(f"{path} is neither a run directory (recipe.yaml) nor a model folder (config.json)")
        base = recipe or load_recipe("phi3-mini-python")
        recipe = base.model_copy(
            update={
                "model": base.model.model_copy(update={"name_or_path": str(source), "revision": None}),
                "tokenizer": base.tokenizer.model_copy(update={"name_or_path": None, "revision": None}),
                "quantization": base.quantization.model_copy(update={"load_in_4bit": False}),
            }
        )
        model = load_base_model(recipe)
    tokenizer = load_tokenizer(recipe)
    disable_avx512_bf16_path(model)
    model.eval()
    return Loaded(model, tokenizer, recipe)


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0) or 4096


def _sampling(cfg: GenerationConfig) -> dict:
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p) if cfg.do_sample else {}
    return dict(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=cfg.do_sample,
        num_beams=cfg.num_beams,
        repetition_penalty=cfg.repetition_penalty,
        **sampling,
    )


def _encode(tokenizer, model, conversations: list[list[dict]], first_index: int = 0):
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    limit = context_length(model)
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    for i, n in enumerate(lengths):
        if n >= limit:
            raise RecipeError(f"prompt {first_index + i} has {n} tokens: longer than the model's context ({limit})")
    return {k: v.to(model.device) for k, v in enc.items()}


def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    cfg: GenerationConfig,
    *,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Batched generation: one answer (the text after the prompt, stripped) per conversation."""
    import torch

    from .model import stop_token_ids

    stops = stop_token_ids(tokenizer, cfg.stop_tokens)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens go on the right: pads must not sit between prompt and answer
    torch.manual_seed(cfg.seed)
    answers: list[str] = []
    try:
        for i in range(0, len(conversations), batch_size):
            chunk = conversations[i : i + batch_size]
            enc = _encode(tokenizer, model, chunk, i)
            with torch.no_grad():
                out = model.generate(**enc, **_sampling(cfg), eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1] :]
            answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        tokenizer.padding_side = side
    return answers


def stream(model, tokenizer, conversation: list[dict], cfg: GenerationConfig) -> Iterator[str]:
    """Yield the answer's text as it is generated (for chat)."""
    from threading import Thread

    import torch
    from transformers import TextIteratorStreamer

    from .model import stop_token_ids

    enc = _encode(tokenizer, model, [conversation])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(
        **enc,
        **_sampling(cfg),
        eos_token_id=stop_token_ids(tokenizer, cfg.stop_tokens),
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
    )
    torch.manual_seed(cfg.seed)
    worker = Thread(target=lambda: model.generate(**kwargs), daemon=True)
    worker.start()
    yield from streamer
    worker.join()


class Coder:
    """The Python API: ``codetune.load(source)`` returns one."""

    def __init__(self, loaded: Loaded):
        self.model, self.tokenizer, self.recipe = loaded.model, loaded.tokenizer, loaded.recipe

    def _config(self, overrides: dict) -> GenerationConfig:
        data = self.recipe.generation.model_dump()
        data.update(overrides)
        return GenerationConfig.model_validate(data)  # out-of-range sampling parameters fail here

    def generate(self, prompt: str | list[str], **overrides) -> str | list[str]:
        """Answer one prompt (a string) or several (a list), each as a single user turn."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        answers = generate(
            self.model,
            self.tokenizer,
            [[{"role": "user", "content": p}] for p in prompts],
            self._config(overrides),
            batch_size=self.recipe.evaluation.batch_size,
        )
        return answers[0] if isinstance(prompt, str) else answers

    def chat(self, messages: list[dict], **overrides) -> str:
        """The assistant's next turn for a conversation of {role, content} messages."""
        return generate(self.model, self.tokenizer, [messages], self._config(overrides))[0]

    def stream(self, messages: list[dict], **overrides) -> Iterator[str]:
        return stream(self.model, self.tokenizer, messages, self._config(overrides))


def load(source: str | Path, **recipe_overrides) -> Coder:
    """Load a run directory, merged model folder or hub id for generation."""
    recipe = None
    if recipe_overrides:
        base = Path(source) / "recipe.yaml"
        recipe = load_recipe(
            base if base.is_file() else "phi3-mini-python",
            [f"{k.replace('__', '.')}={v}" for k, v in recipe_overrides.items()],
        )
    return Coder(load_for_inference(source, recipe=recipe))
