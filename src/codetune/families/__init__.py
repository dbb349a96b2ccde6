"""Model families: everything codetune knows about one architecture, one file per family.

A family is matched on the Hugging Face config's ``model_type``. It carries what the rest of
codetune must not hard-code: where the chat template comes from, the stop and pad tokens, the LoRA
target modules by role, the recipe a bare model folder or hub id gets, the tiny configuration
that ``builtin:tiny-<family>`` and the tests are built from, and (where supported) the GGUF
tensor plan. An unknown ``model_type`` gets :data:`GENERIC`: the tokenizer's own template and eos,
which is all that training, evaluation and merging need.

Adding a family is one new module here that defines ``FAMILY``: every module of this package is a
family, found when first asked for (modules whose name starts with ``_`` are helpers, not families).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CodetuneError
from ._gguf import GGUFPlan


@dataclass(frozen=True)
class TinySpec:
    """How ``builtin:tiny-<family>`` is built: its tokenizer's special tokens and template, its config."""

    special_tokens: tuple[str, ...]  # given the first ids, in this order
    bos_token: str | None
    eos_token: str
    unk_token: str | None
    pad_token: str
    chat_template: str  # Jinja text
    # tokenizer -> a transformers config for a model of a few hundred thousand parameters
    config: Callable[[Any], Any]
    version: str  # bump when anything above (or tiny_shape) changes, so a stale cache is never reused
    pretrain_steps: int = 600  # the same for every family (parity: README, "Model families")
    # Special tokens of the family that generation must stop on, besides the eos.
    stop_tokens: tuple[str, ...] = ()
    # The split regex of the family's hub tokenizer.json, where transformers does not put it back itself (it
    # does for Qwen2's); None: GPT-2's. It decides where a prompt's last token ends: with GPT-2's, Llama 3's
    # generation prompt (ending "\n\n") ends on a token its trained answers never had there.
    split_regex: str | None = None


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    description: str
    # A built-in template name (templates.py) or None: the tokenizer's own.
    chat_template: str | None
    # Empty: the tokenizer's eos only.
    stop_tokens: tuple[str, ...]
    # None: the tokenizer's own pad token.
    pad_token: str | None
    # The token that closes an assistant turn: answer-only loss stops after it, so what the template
    # writes after it (a newline, the next turn) is never trained. None: the answer owns everything up
    # to the next turn (Phi-3 trains its "<|end|>\n<|endoftext|>" tail, which teaches the eos).
    turn_end: str | None
    # role -> module names, for recipes that target by role; "all-linear" stays the default.
    lora_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The recipe a model folder or hub id of this family gets when none is named.
    default_recipe: str | None = None
    # The card's chat-format example: one user turn, rendered up to where the answer starts.
    prompt_example: str | None = None
    tiny: TinySpec | None = None
    # Its llama.cpp architecture; None: GGUF export refuses this family.
    gguf_plan: GGUFPlan | None = None
    # Defaults for the chat template's variables (Qwen3: enable_thinking false), written into the template
    template_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def builtin(self) -> str | None:
        return f"builtin:tiny-{self.name}" if self.tiny else None

    def lora_modules(self, *roles: str) -> list[str]:
        """Module names for ``roles`` (attention, mlp), in the family's order."""
        unknown = [r for r in roles if r not in self.lora_targets]
        if unknown:
            raise KeyError(f"family {self.name}: no LoRA role {unknown[0]!r}; it has {', '.join(self.lora_targets)}")
        return [m for r in roles for m in self.lora_targets[r]]

    def recipe_values(self) -> dict[str, Any]:
        """What this family says for each recipe field that defaults to ``family`` (recipe.FAMILY_FIELDS):
        its template, pad and stop tokens, and LoRA on every module of its roles (all-linear without roles)."""
        return {
            "tokenizer.chat_template": self.chat_template,
            "tokenizer.pad_token": self.pad_token,
            "lora.target_modules": self.lora_modules(*self.lora_targets) or "all-linear",
            "generation.stop_tokens": list(self.stop_tokens),
        }

    def recipe_overrides(self) -> list[str]:
        """``--set`` items that fit a recipe written for another family to this one (its template, pad and
        stop tokens; the recipe's LoRA targets stay)."""
        import json

        values = self.recipe_values()
        values.pop("lora.target_modules")
        return [f"{field}={json.dumps(value)}" for field, value in values.items()]


GENERIC = Family(
    name="generic",
    model_types=(),
    description="any other architecture: the tokenizer's own chat template, eos and pad token",
    chat_template=None,
    stop_tokens=(),
    pad_token=None,
    turn_end=None,
)


class FamilyError(CodetuneError):
    """A family module that cannot be used: no FAMILY, or a name or model_type another family has."""


def tiny_shape(tokenizer, **overrides) -> dict:
    """The config fields every tiny builtin shares, so that every family's tiny model learns what the demo
    shows (README, "Model families"): 2 layers of width 128 (MLP 256), 4 heads with 4 KV heads, rope base
    10,000, a head of its own (untied; the tiny Llama ties it, families/llama.py says why), 1,024 positions, the vocabulary padded to a multiple of 64 and the
    tokenizer's own bos/eos/pad ids. At width 64 with 2 KV heads and rope base 10^6, the tiny Qwen2 passed
    none of the held-out tasks the tiny Phi-3 passed half of. A family's ``tiny_config`` passes these to its
    config class, with its own ``overrides``."""
    shape = dict(
        vocab_size=((len(tokenizer) + 63) // 64) * 64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    shape.update(overrides)
    return shape


def families() -> dict[str, Family]:
    """Every family module of this package by family name (GENERIC excluded), in name order.

    Listed on every call (a directory listing; the modules are imported once), so a family file added to
    the package, or a folder added to its ``__path__``, is found without registering it anywhere."""
    out: dict[str, Family] = {}
    files: dict[str, str] = {}  # family name -> its file
    claimed: dict[str, str] = {}  # model_type -> the file that claims it
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        where = getattr(module, "__file__", None) or module.__name__
        fam = getattr(module, "FAMILY", None)
        if not isinstance(fam, Family):
            raise FamilyError(
                f"{where}: a model family module must define FAMILY = Family(...) (or start its name with _)"
            )
        if fam.name in out:
            raise FamilyError(f"{where}: family name {fam.name!r} is taken by {files[fam.name]}")
        for model_type in fam.model_types:
            if model_type in claimed:
                raise FamilyError(f"{where}: model_type {model_type!r} is already claimed by {claimed[model_type]}")
            claimed[model_type] = where
        out[fam.name], files[fam.name] = fam, where
    return dict(sorted(out.items()))


def _model_type(config_or_model_type: Any) -> str | None:
    if config_or_model_type is None or isinstance(config_or_model_type, str):
        return config_or_model_type
    if isinstance(config_or_model_type, dict):
        return config_or_model_type.get("model_type")
    return getattr(config_or_model_type, "model_type", None)


def family_for(config_or_model_type: Any) -> Family:
    """The family of a config (transformers config, config.json dict) or a model_type; GENERIC if unknown."""
    model_type = _model_type(config_or_model_type)
    for fam in families().values():
        if model_type in fam.model_types:
            return fam
    return GENERIC


def family_named(name: str) -> Family:
    known = families()
    if name not in known:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(known)}")
    return known[name]


def builtin_models() -> dict[str, Family]:
    """``builtin:tiny-<family>`` -> its family."""
    return {f.builtin: f for f in families().values() if f.tiny}


def gguf_families() -> list[str]:
    return [f.name for f in families().values() if f.gguf_plan is not None]


def looks_local(name: str) -> bool:
    """A model name meant as a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``, or one that exists), not a hub id."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


class FamilyConfigError(CodetuneError):
    """A hub model's config.json could not be read, so its family is not known."""


def family_for_source(source: str | Path, *, revision: str | None = None, strict: bool = False) -> Family:
    """The family of a builtin name, model folder or hub id, from its config.json; GENERIC when unreadable.

    Reading the config is cheap (one small file, cached by the hub client); a source whose config cannot
    be read fails later, where the model itself is loaded, with that stage's own message. ``strict``: a hub
    id whose config cannot be read is a FamilyConfigError instead (its family would be a guess).
    """
    name = str(source)
    if name in builtin_models():
        return builtin_models()[name]
    path = Path(name).expanduser()
    if path.is_dir():
        import json

        try:
            return family_for(json.loads((path / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return GENERIC
    if looks_local(name):
        return GENERIC  # a local path that is not there: the stage that loads it names it
    try:
        from transformers import AutoConfig

        return family_for(AutoConfig.from_pretrained(name, revision=revision))
    except Exception as exc:  # offline, unknown id, remote code: nothing family-specific is known
        if strict:
            reason = " ".join(str(exc).split()).split(". ")[0][:160]
            raise FamilyConfigError(f"cannot read the config of {name!r} to know its model family ({reason})") from None
        return GENERIC


__all__ = [
    "GENERIC",
    "Family",
    "FamilyConfigError",
    "FamilyError",
    "GGUFPlan",
    "TinySpec",
    "builtin_models",
    "families",
    "family_for",
    "family_for_source",
    "family_named",
    "gguf_families",
    "looks_local",
    "tiny_shape",
]
