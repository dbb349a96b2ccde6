"""Generation from a run directory (base + adapter), a merged model folder or a hub id.

Prompts are rendered with the recipe's chat template, batched with left padding and the KV
cache, and stop on every stop token of the recipe (``<|end|>`` as well as end-of-text).
"""

from __future__ import annotations

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

        base = load_base_model(recipe)
        model = PeftModel.from_pretrained(base, str(adapter))
        tokenizer = load_tokenizer(recipe)
    else:
        overrides = [f"model.name_or_path={source}", "quantization.load_in_4bit=false"]
        recipe = recipe or load_recipe("phi3-mini-python", overrides)
        model = load_base_model(recipe)
        tokenizer = load_tokenizer(recipe)
    disable_avx512_bf16_path(model)
    model.eval()
    return Loaded(model, tokenizer, recipe)


def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    cfg: GenerationConfig,
    *,
    batch_size: int = 8,
    stop_tokens: list[str] | None = None,
) -> list[str]:
    """Batched generation: one answer (text after the prompt, stripped) per conversation."""
    import torch

    from .model import stop_token_ids

    stops = stop_token_ids(tokenizer, stop_tokens or cfg.stop_tokens)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right; pads must not sit between
    torch.manual_seed(cfg.seed)
    answers: list[str] = []
    try:
        for i in range(0, len(conversations), batch_size):
            chunk = conversations[i : i + batch_size]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p) if cfg.do_sample else {}
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=cfg.max_new_tokens,
                    do_sample=cfg.do_sample,
                    num_beams=cfg.num_beams,
                    repetition_penalty=cfg.repetition_penalty,
                    eos_token_id=stops,
                    pad_token_id=tokenizer.pad_token_id,
                    **sampling,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    finally:
        tokenizer.padding_side = side
    return answers
