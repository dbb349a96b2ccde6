"""``codetune merge`` and ``codetune export``: a fine-tune as a plain model folder, and as GGUF.

Merging reloads the base model *unquantized* (bf16 by default) and folds the adapter into it. It
never merges into 4-bit weights: that would round the adapter's small updates away.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .recipe import RecipeError, load_recipe

MERGED = "merged"


def merged_model(recipe, adapter_dir: Path, *, dtype: str | None = None, device_map=None):
    """The recipe's base, unquantized in ``dtype`` (default: the compute dtype), with the adapter folded in."""
    from peft import PeftModel

    from .model import load_base_model

    base = load_base_model(recipe, quantize=False, dtype=dtype, device_map=device_map)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def merge(run_dir: Path, out_dir: Path | None = None, *, dtype: str = "bfloat16", log=print) -> Path:
    """Base (unquantized, ``dtype``) + adapter -> one model folder with safetensors, tokenizer and a
    generation config that stops on every stop token of the recipe (``<|end|>`` included)."""
    from .model import load_tokenizer, stop_token_ids
    from .train import ADAPTER

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise RecipeError(f"{run_dir} is not a run directory (no recipe.yaml)")
    adapter = run_dir / ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        raise RecipeError(f"{run_dir} has no trained adapter ({adapter} is missing): run `codetune train` first")
    recipe = load_recipe(run_dir / "recipe.yaml")
    out_dir = Path(out_dir) if out_dir else run_dir / MERGED

    model = merged_model(recipe, adapter, dtype=dtype)
    tokenizer = load_tokenizer(recipe)
    stops = stop_token_ids(tokenizer, recipe.generation.stop_tokens)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.config.use_cache = True

    staging = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "codetune_merge.json").write_text(
        json.dumps(
            {"run_dir": str(run_dir), "recipe": recipe.name, "base": recipe.model.name_or_path, "dtype": dtype},
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    log(f"merged {recipe.model.name_or_path} + {adapter} ({dtype}) -> {out_dir}")
    return out_dir
