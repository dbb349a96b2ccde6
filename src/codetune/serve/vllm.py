"""``codetune serve --engine vllm``: the ``vllm serve`` command for the same model and adapter."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ..errors import InputError, RecipeError
from ..recipe import load_recipe
from ..source import Source

# vLLM sizes its LoRA buffers for one of these ranks and refuses any other --max-lora-rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank r."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise RecipeError(f"lora.r {r} is over the largest LoRA rank vLLM serves ({VLLM_LORA_RANKS[-1]}): merge it first")


VLLM_ENV_VAR = "CODETUNE_VLLM"
VLLM_SETUP = (
    "vLLM pins an older transformers than codetune's, so it lives in its own environment: "
    "`python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm` (or `make vllm-env`), then "
    "--vllm .venv-vllm/bin/vllm (or CODETUNE_VLLM=...)"
)


def find_vllm(explicit: str | Path | None = None) -> Path:
    """The ``vllm`` executable of vLLM's own environment: ``explicit`` (--vllm: the executable or the
    environment's folder), else $CODETUNE_VLLM, else ``vllm`` on PATH. One in codetune's own environment is
    refused: installing vLLM there replaced the transformers codetune needs."""
    given = explicit or os.environ.get(VLLM_ENV_VAR)
    if given:
        path = Path(given).expanduser()
        if path.is_dir():
            path = path / "bin" / "vllm"
        if not (path.is_file() and os.access(path, os.X_OK)):
            origin = "--vllm" if explicit else VLLM_ENV_VAR
            raise InputError(f"{origin} {given}: {path} is not an executable vllm; {VLLM_SETUP}")
    else:
        found = shutil.which("vllm")
        if found is None:
            raise InputError(f"vLLM is not found (no vllm on PATH, no --vllm); {VLLM_SETUP}")
        path = Path(found)
    if path.absolute().parent == Path(sys.executable).absolute().parent:
        raise InputError(f"{path} is in codetune's own environment (uninstall it there): {VLLM_SETUP}")
    return path


def vllm_command(
    source: str | Path,
    *,
    host: str,
    port: int,
    name: str | None = None,
    api_key: str | None = None,
    max_tokens_limit: int = 1024,
) -> list[str]:
    """The ``vllm serve`` command for a run directory (base model + LoRA adapter), a merged model folder or
    a hub id. It writes nothing: ``--dry-run`` only prints it."""
    src = Source.of(source)  # a missing path, an empty run folder or a foreign folder is refused, named
    path = Path(source)
    cmd = ["vllm", "serve"]
    if src.run is not None:
        recipe = load_recipe(src.run.recipe_file)
        if recipe.model.name_or_path.startswith("builtin:"):
            raise RecipeError("vLLM needs a hub id or a model folder: merge the tiny model first (codetune merge)")
        adapter = src.adapter
        run = src.run
        lora_name = name or path.resolve().name
        config = run.read_adapter_config()  # checked (runfiles): r and rank_pattern are whole numbers
        # the adapter's own ranks, per-module ones included, are what vLLM must hold
        rank = max([int(config.get("r") or recipe.lora.r), *map(int, (config.get("rank_pattern") or {}).values())])
        cmd += [recipe.model.name_or_path]
        if recipe.model.revision:
            cmd += ["--revision", recipe.model.revision]
        cmd += [
            "--enable-lora",
            "--lora-modules",
            f"{lora_name}={adapter.resolve()}",
            "--max-lora-rank",
            str(vllm_lora_rank(rank)),
            "--max-model-len",
            str(recipe.tokenizer.model_max_length or 4096),
        ]
        if recipe.tokenizer.chat_template:
            # training saved the tokenizer, with the recipe's template, next to the adapter
            template = adapter / "chat_template.jinja"
            if not template.is_file():
                raise RecipeError(
                    f"{template} is missing: the recipe names a chat template that vLLM would not know; "
                    "retrain, or merge the run and serve the merged folder"
                )
            cmd += ["--chat-template", str(template.resolve())]
    elif src.kind == "model":
        cmd += [str(path.resolve()), "--served-model-name", name or path.resolve().name]
    else:
        cmd += [str(source), "--served-model-name", name or path.name]
    cmd += ["--host", host, "--port", str(port), "--max-num-seqs", "64"]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd
