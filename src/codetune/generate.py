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


def load_for_inference(source: str | Path, *, recipe: Recipe | None = None, merged: bool = False) -> Loaded:
    """A run directory (its recipe's base model plus ``adapter/``), or anything ``from_pretrained`` takes.

    ``merged``: for a run directory, the adapter merged into the unquantized base in the compute dtype
    (as the reference notebook evaluated) instead of the 4-bit base with the adapter on top.
    """
    from .model import disable_avx512_bf16_path, load_base_model, load_tokenizer
    from .train import ADAPTER

    path = Path(source)
    if (path / "recipe.yaml").is_file():
        recipe = recipe or load_recipe(path / "recipe.yaml")
        adapter = path / ADAPTER
        if not (adapter / "adapter_config.json").is_file():
            raise RecipeError(f"{path} has no trained adapter ({adapter} is missing): run `codetune train` first")
        if merged:
            import torch

            from .export import merged_model

            # unquantized weights stay where they load; the 4-bit path is placed on the GPU by bitsandbytes
            model = merged_model(recipe, adapter, device_map={"": 0} if torch.cuda.is_available() else None)
        else:
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


def _prompt_ids(tokenizer, model, conversations: list[list[dict]], first_index: int = 0) -> list[list[int]]:
    limit = context_length(model)
    ids = []
    for i, conv in enumerate(conversations):
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        row = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(row) >= limit:
            raise RecipeError(
                f"prompt {first_index + i} has {len(row)} tokens: longer than the model's context ({limit})"
            )
        ids.append(row)
    return ids


def _left_padded(rows: list[list[int]], pad_id: int, device):
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


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
    """Batched generation: one answer (the text after the prompt, stripped) per conversation.

    Each batch is left-padded and decoded with the KV cache by ``model.generate``. A batch runs in
    *waves* of new tokens (32, then 64, 128, ...): after each wave the rows that hit a stop token
    leave, and the rest go on together from where they stopped. Without waves one long answer keeps
    a whole batch busy until it ends. ``first_wave=None`` decodes each batch in one call.
    """
    import torch

    from .model import stop_token_ids

    stops = set(stop_token_ids(tokenizer, cfg.stop_tokens))
    sampling = _sampling(cfg)
    torch.manual_seed(cfg.seed)
    all_prompts = _prompt_ids(tokenizer, model, conversations)
    # Batches of similar prompt lengths carry less padding; answers go back in the caller's order.
    order = sorted(range(len(all_prompts)), key=lambda i: len(all_prompts[i]))
    answers: list[str] = [""] * len(all_prompts)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        prompts = [all_prompts[i] for i in chosen]
        new: list[list[int]] = [[] for _ in prompts]
        pending = list(range(len(prompts)))
        budget = cfg.max_new_tokens
        wave = min(first_wave or budget, budget)
        while pending and budget > 0:
            enc = _left_padded([prompts[i] + new[i] for i in pending], tokenizer.pad_token_id, model.device)
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    **{**sampling, "max_new_tokens": wave},
                    # On a CPU a preallocated cache beats growing one by concatenation every step; on a GPU
                    # transformers would compile for it, once per wave shape, which costs more than it saves.
                    cache_implementation="static" if model.device.type == "cpu" else None,
                    eos_token_id=sorted(stops),
                    pad_token_id=tokenizer.pad_token_id,
                )
            still = []
            for row, i in zip(out[:, enc["input_ids"].shape[1] :].tolist(), pending, strict=True):
                cut = next((j for j, t in enumerate(row) if t in stops), None)
                new[i] += row if cut is None else row[:cut]
                if cut is None and len(row) == wave:
                    still.append(i)
            budget -= wave
            wave = min(wave * 2, budget)
            pending = still
        for i, ids in zip(chosen, new, strict=True):
            answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(len(prompts))
    return answers


def stream(model, tokenizer, conversation: list[dict], cfg: GenerationConfig) -> Iterator[str]:
    """Yield the answer's text as it is generated (for chat)."""
    from threading import Thread

    import torch
    from transformers import TextIteratorStreamer

    from .model import stop_token_ids

    enc = _left_padded(_prompt_ids(tokenizer, model, [conversation]), tokenizer.pad_token_id, model.device)
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
