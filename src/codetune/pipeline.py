"""``codetune.run``: the stages of a fine-tune, chained on one run directory.

    prepare -> train -> rl (when the recipe has ``rl:``) -> evaluate -> card

Every check that can fail runs first, once, before anything is written (the recipe, the run directory,
the model source, the tokenizer, the LoRA targets, an earlier training that ``overwrite`` would replace);
then each stage reads the recipe and the run directory and writes its files there. The CLI's ``run``,
``train`` and ``prepare`` commands and the Python API (``codetune.run``) all come through here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .card import write_card
from .evaluate import evaluate
from .prepare import PrepareResult, prepare
from .recipe import Recipe, load_recipe, run_recipe, save_recipe
from .rl import RLResult, check_rollouts
from .rl import rl as rl_stage
from .rundir import RunDir
from .source import Source
from .train import TrainResult, check, data_matches, process_state
from .train import train as train_stage

STAGES = ("prepare", "train", "rl", "evaluate", "card")


@dataclass
class RunResult:
    """What each stage that ran produced."""

    run_dir: Path
    recipe: Recipe
    note: str | None = None  # which recipe was used, when the run directory's own replaced the named one
    prepared: PrepareResult | None = None
    trained: TrainResult | None = None
    summary: dict[str, Any] | None = None  # the evaluation's
    rl: RLResult | None = None
    rl_summary: dict[str, Any] | None = None  # the evaluation of rl/adapter, in rl/eval/
    card: Path | None = None


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def resolve(
    recipe: Recipe | str | Path,
    run_dir: Path | None = None,
    overrides: Sequence[str] = (),
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> tuple[Recipe, Path, str | None]:
    """The recipe a run uses and its run directory: a named recipe or file (with ``overrides``), or the run
    directory's own once the run exists (``recipe.run_recipe``), and a note saying which; a ``Recipe``
    object as given (with ``overrides``)."""
    named = load_recipe(recipe, list(overrides))
    rd = Path(run_dir) if run_dir is not None else default_run_dir(named)
    if isinstance(recipe, Recipe):  # a recipe built in Python is used as given
        return named, rd, None
    chosen, note = run_recipe(named, list(overrides), rd, resume=resume, overwrite=overwrite)
    return chosen, rd, note


def run(
    recipe: Recipe | str | Path,
    run_dir: Path | None = None,
    *,
    overrides: Sequence[str] = (),
    stages: Sequence[str] = STAGES,
    resume: bool = False,
    overwrite: bool = False,
    skip_invalid: bool = False,
    console=None,
    callbacks: list | None = None,
) -> RunResult:
    """Run ``stages`` (in pipeline order) of ``recipe`` in ``run_dir`` (default ``runs/<recipe name>``).

    ``prepare`` always prepares (unless ``resume``); ``train`` without ``prepare`` prepares only when the
    run has no data made from this recipe. ``overwrite`` starts a trained run over (its training, and what
    was made from it, is deleted only once the new data is in place); ``resume`` continues training from
    the last complete checkpoint. Evaluation and the card run on the main process only."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: the stages are {', '.join(STAGES)}")
    if resume and overwrite:
        from .errors import InputError

        raise InputError("--resume and --overwrite contradict each other: continue the run, or start it over")
    recipe, rd, note = resolve(recipe, run_dir, overrides, resume=resume, overwrite=overwrite)
    say = _say(console)
    if note:
        say(f"note: {note}")
    result = RunResult(rd, recipe, note)
    checked = _check(recipe, rd, stages, resume, overwrite, say)
    result.prepared = _ready(recipe, rd, stages, checked, resume, overwrite, skip_invalid, say)
    if "train" in stages:
        result.trained = train_stage(recipe, rd, resume=resume, console=console, callbacks=callbacks, checked=checked)
    if not _is_main():
        return result
    if "rl" in stages and recipe.rl is not None and not (resume and RunDir(rd).rl_summary.is_file()):
        result.rl = rl_stage(recipe, rd, console=console, resume=resume)
    if "evaluate" in stages:
        suites = recipe.evaluation.suites
        kw = dict(recipe=recipe, console=console, overwrite=overwrite or resume)
        result.summary = evaluate(rd, suites, compare_base=recipe.evaluation.compare_base, **kw)
        if recipe.rl is not None and RunDir(rd).rl_adapter.is_dir():  # GRPO's adapter, beside SFT's: rl/eval/
            result.rl_summary = evaluate(Source.of(rd, stage="rl"), suites, compare_base=False, **kw)
    if "card" in stages:
        result.card = write_card(rd, overwrite=overwrite or resume)
    return result


def train(recipe: Recipe | str | Path, run_dir: Path | None = None, **kwargs) -> TrainResult:
    """``codetune train``: prepare the data when the run has none for this recipe, then train."""
    return run(recipe, run_dir, stages=("train",), **kwargs).trained


def _check(recipe: Recipe, rd: Path, stages: Sequence[str], resume: bool, overwrite: bool, say):
    """Every check of the stages that will run, before anything is written: for training, ``train.check``
    (which also refuses a trained run without ``overwrite``); for prepare alone, that the run directory
    may be written and, when it has trained, that ``overwrite`` allows starting it over. GRPO's own checks
    need the trained adapter; what needs none (rollouts that cannot run here) is checked now, not after SFT."""
    if "rl" in stages and recipe.rl is not None:
        check_rollouts(recipe.rl)
    if "train" in stages:
        return check(recipe, rd, resume=resume, overwrite=overwrite, say=say)
    return None  # prepare alone checks the run directory and the tokenizer itself, before any work


def _ready(recipe: Recipe, rd: Path, stages, checked, resume: bool, overwrite: bool, skip_invalid: bool, say):
    """Prepare the data (when the stages ask for it, or training needs it) and save the recipe, on the main
    process while the others wait; an earlier training that ``overwrite`` replaces goes only after the new
    data is in place, so a bad source or row leaves the run as it was."""
    state = process_state()
    prepared = None
    explicit = "prepare" in stages and not resume
    needed = checked is not None and not checked.data_matches and checked.finished is None
    tokenizer = checked.tokenizer if checked is not None else None
    with state.main_process_first():  # one process writes; the others then read its files
        if not state.is_main_process:
            pass
        elif explicit or needed:  # prepare writes data/ and the recipe, then clears what they replace
            if needed and not explicit:
                say("preparing data (run directory has none for this recipe)")
            prepared = prepare(recipe, rd, skip_invalid=skip_invalid, overwrite=overwrite, log=say, tokenizer=tokenizer)
        elif checked is not None and checked.finished is None:  # training, on data already prepared
            run = RunDir(rd).ensure()
            if checked.start_over:
                run.clear_training()
            save_recipe(recipe, rd)
    return prepared


def _say(console) -> Callable[[str], None]:
    """Progress lines, from the main process only (under ``accelerate launch`` every process runs this)."""
    if console is None or not _is_main():
        return lambda message: None
    return lambda message: console.print(message, highlight=False, markup=False)


def _is_main() -> bool:
    return process_state().is_main_process


__all__ = ["STAGES", "RunResult", "data_matches", "default_run_dir", "resolve", "run", "train"]
