"""What a command is pointed at: a run directory, a model folder, a hub id or a builtin model.

Every command that takes a SOURCE (eval, generate, chat, serve, ``codetune.load``) resolves it here,
once, and asks the result for its recipe, adapter and family, so that "is this a run?" has one answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import RecipeError
from .families import Family, builtin_models, families, family_for_source
from .recipe import Recipe, load_recipe
from .rundir import MERGED_RECIPE, RECIPE_FILE, RunDir, is_kind

Kind = Literal["run", "model", "hub", "builtin"]
MODEL_CONFIG = "config.json"  # transformers': a folder holding it is a model folder


@dataclass(frozen=True)
class Source:
    """A resolved source. ``kind``: ``run`` (a codetune run directory: its recipe, base model + adapter),
    ``model`` (a saved model folder: a merged run or any ``save_pretrained`` output), ``hub`` (a hub id),
    ``builtin`` (a tiny model codetune builds, ``builtin:tiny-phi3``)."""

    name: str
    kind: Kind
    path: Path | None = None
    stage: str = "sft"  # a run's adapter: sft (adapter/) or rl (rl/adapter, codetune rl's)

    @classmethod
    def of(cls, source: str | Path | Source, *, stage: str | None = None) -> Source:
        """``stage``: a run's adapter to use (sft, rl); None keeps a Source's own (sft for a new one)."""
        found = source if isinstance(source, Source) else cls._resolve(str(source))
        if stage is None or stage == found.stage:
            return found
        if found.kind != "run":
            raise RecipeError(f"--adapter {stage}: {found.name} is not a run directory; only a run has an {stage} adapter")
        return cls(found.name, found.kind, found.path, stage)

    @classmethod
    def _resolve(cls, text: str) -> Source:
        if text.startswith("builtin:"):
            return cls(text, "builtin")
        path = Path(text).expanduser()
        if path.exists():
            return cls(text, _folder_kind(path), path)
        _refuse_missing_path(text)
        return cls(text, "hub")

    def __str__(self) -> str:
        return self.name

    @property
    def run(self) -> RunDir | None:
        return RunDir(self.path, self.stage) if self.kind == "run" else None

    @property
    def folder(self) -> Path | None:
        """A folder that may record what its model trained on (a run or a model folder)."""
        return self.path if self.kind in ("run", "model") else None

    @property
    def adapter(self) -> Path:
        """A run's trained adapter (the one error message for a run without one)."""
        if self.run is None:
            raise RecipeError(f"{self.name} is not a run directory: it has no adapter")
        return self.run.require_adapter()

    def family(self, revision: str | None = None) -> Family:
        if self.run is not None:
            return family_for_source(self.recipe().model.name_or_path, revision=self.recipe().model.revision)
        return family_for_source(self.name, revision=revision)

    def recipe(self, named: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
        """The recipe whose settings apply: a run's own ``recipe.yaml``; else ``named``; else the recipe a
        merged folder carries from its run (``MERGED_RECIPE``); else the default recipe of this model's
        family (``recipe_for_source``)."""
        if self.run is not None:
            return load_recipe(self.run.recipe_file, overrides or [])
        if named is not None:
            return load_recipe(named, overrides or [])
        if self.kind == "model" and (self.path / MERGED_RECIPE).is_file():
            return load_recipe(self.path / MERGED_RECIPE, overrides or [])
        return recipe_for_source(self.name, overrides)

    def model_recipe(self, recipe: Recipe) -> Recipe:
        """``recipe`` with this source as its model (not a run: the weights are this folder's or hub id's,
        loaded unquantized, with the tokenizer saved beside them)."""
        if self.run is not None:
            return recipe
        return recipe.model_copy(
            update={
                "model": recipe.model.model_copy(update={"name_or_path": self.name, "revision": None}),
                "tokenizer": recipe.tokenizer.model_copy(update={"name_or_path": None, "revision": None}),
                "quantization": recipe.quantization.model_copy(update={"load_in_4bit": False}),
            }
        )


def _folder_kind(path: Path) -> Kind:
    rd = RunDir(path)
    if rd.recipe_file.is_file():
        return "run"
    if (path / MODEL_CONFIG).is_file():
        return "model"
    if path.is_dir() and is_kind(path, "run"):
        raise RecipeError(
            f"{path}: a run directory with nothing trained yet (no {RECIPE_FILE}): "
            f"run `codetune train RECIPE --run-dir {path}` first"
        )
    raise RecipeError(f"{path} is neither a run directory ({RECIPE_FILE}) nor a model folder ({MODEL_CONFIG})")


def _refuse_missing_path(text: str) -> None:
    """Refuse a path-like source that does not exist, instead of taking a typo for a hub id.

    A hub id is ``NAME`` or ``OWNER/NAME``; a source that starts like a path, has more than one
    ``/``, or whose first part is a folder here (``runs/tiny-cpx`` next to ``runs/``) is a path.
    """
    parts = text.replace("\\", "/").split("/")
    path_like = (
        text.startswith(("/", ".", "~"))
        or "\\" in text
        or len(parts) > 2
        or text.endswith("/")
        or (len(parts) == 2 and Path(parts[0]).is_dir())
    )
    if path_like:
        raise RecipeError(
            f"no such run directory or model folder: {text} does not exist (check the path; a hub id is OWNER/NAME)"
        )


def recipe_for_source(source: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe for a model folder or hub id that is not a run: its family's default recipe. A family
    without one (or an unknown model type) gets phi3-mini-python's settings fitted to it: its template,
    pad and stop tokens (for an unknown type, the tokenizer's own template, pad and eos)."""
    fam = builtin_models().get(str(source)) or family_for_source(source)
    if fam.default_recipe:
        return load_recipe(fam.default_recipe, overrides or [])
    return load_recipe(families()["phi3"].default_recipe, [*fam.recipe_overrides(), *(overrides or [])])
