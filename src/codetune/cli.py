"""The ``codetune`` command line. It only parses arguments and calls the stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .recipe import Recipe, RecipeError, load_recipe, shipped_recipes

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_show_locals=False)
recipe_app = typer.Typer(no_args_is_help=True, help="Inspect recipes.")
app.add_typer(recipe_app, name="recipe")
console = Console(stderr=True)
out = Console()

RecipeArg = Annotated[str, typer.Argument(help="A shipped recipe name (see `codetune recipes`) or a .yaml file")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a field: --set training.learning_rate=2e-4 (repeatable)"),
]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", "-o", help="Default: runs/<recipe name>")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue from the run directory's last complete checkpoint")]
OverwriteOpt = Annotated[bool, typer.Option(help="Delete the run directory's earlier training and start over")]
SkipOpt = Annotated[bool, typer.Option(help="Set bad rows aside in data/rejected.jsonl")]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load(recipe: str, overrides: list[str] | None) -> Recipe:
    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as exc:
        _fail(str(exc))
        raise  # unreachable, for type checkers


def _run_dir(recipe: Recipe, run_dir: Path | None) -> Path:
    return run_dir if run_dir is not None else Path("runs") / recipe.name


@app.callback()
def main() -> None:
    """codetune: fine-tune a small open LLM into a Python coder with QLoRA, and prove it by running its code."""


@app.command("recipes")
def recipes_cmd() -> None:
    """List the shipped recipes."""
    table = Table("recipe", "description", title="shipped recipes")
    for name, desc in shipped_recipes().items():
        table.add_row(name, desc)
    out.print(table)


@recipe_app.command("show")
def recipe_show(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Print a recipe fully resolved (defaults filled in, overrides applied) as YAML."""
    out.print(_load(recipe, set_).to_yaml(), highlight=False, markup=False, end="")


def _prepare(recipe: Recipe, run_dir: Path, skip_invalid: bool) -> None:
    from .data import DataError, prepare

    try:
        result = prepare(recipe, run_dir, skip_invalid=skip_invalid, log=lambda m: console.print(m, highlight=False))
    except (RecipeError, DataError) as exc:
        _fail(str(exc))
        return
    s = result.stats
    rows, tokens, pad = s["rows"], s["tokens"]["train"], s["padding"]
    table = Table("", "", title=f"prepared {recipe.name}", show_header=False)
    table.add_row("rows read / valid", f"{rows['read']} / {rows['valid']}")
    table.add_row("train / test split", f"{rows['train_split']} / {rows['test_split']}")
    if "duplicates_removed" in rows:
        table.add_row("duplicates removed", str(rows["duplicates_removed"]))
    if "decontaminated" in rows:
        table.add_row("decontaminated", ", ".join(f"{k} {v}" for k, v in rows["decontaminated"].items()))
    table.add_row("train / test rows written", f"{rows['train_final']} / {rows['test_final']}")
    table.add_row(
        "train tokens min / median / p95 / max",
        f"{tokens['min']} / {tokens['median']} / {tokens['p95']} / {tokens['max']}",
    )
    table.add_row("truncated (train)", f"{s['truncated_share']['train']:.1%}")
    table.add_row("tokens that carry loss", f"{s['trained_token_share']:.1%}")
    table.add_row(
        f"padding: batches of {pad['batch_size']} / packed",
        f"{pad['padded_batches_share']:.1%} / {pad['packed_share']:.1%}",
    )
    out.print(table)
    out.print(f"data  -> {result.data_dir}")


@app.command("accelerate-config")
def accelerate_config_cmd(
    name: Annotated[str, typer.Argument(help="ddp, fsdp_qlora or deepspeed_zero3")],
) -> None:
    """Print the path of a shipped `accelerate` config, for `accelerate launch --config_file`."""
    from importlib import resources

    entry = resources.files("codetune.accelerate") / f"{name}.yaml"
    if not entry.is_file():
        known = sorted(
            p.name[:-5] for p in resources.files("codetune.accelerate").iterdir() if p.name.endswith(".yaml")
        )
        _fail(f"unknown accelerate config {name!r}: shipped configs are {', '.join(known)}")
    out.print(str(entry), highlight=False, soft_wrap=True)


@app.command("prepare")
def prepare_cmd(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    skip_invalid: SkipOpt = False,
) -> None:
    """Check, format, split, deduplicate, decontaminate and tokenize the recipe's data."""
    r = _load(recipe, set_)
    _prepare(r, _run_dir(r, run_dir), skip_invalid)


def _train(recipe: Recipe, run_dir: Path, resume: bool, overwrite: bool, skip_invalid: bool):
    from .data import DataError
    from .train import NonFiniteLossError, train

    try:
        result = train(recipe, run_dir, resume=resume, overwrite=overwrite, console=console, skip_invalid=skip_invalid)
    except (RecipeError, DataError, NonFiniteLossError) as exc:
        _fail(str(exc))
        return None
    s = result.summary
    if s["world_size"] > 1 and not _is_main():
        return result
    table = Table("", "", title=f"trained {recipe.name}", show_header=False)
    table.add_row("optimizer steps", str(s["global_step"]))
    table.add_row("last training / validation loss", f"{_f(s['last_train_loss'])} / {_f(s['last_eval_loss'])}")
    table.add_row("tokens seen", f"{s['tokens']:,}")
    table.add_row("trainable parameters", f"{s['trainable_parameters']:,}")
    table.add_row("wall time", f"{s['wall_s_this_session']:.1f} s")
    out.print(table)
    out.print(f"adapter  -> {result.adapter_dir}")
    out.print(f"metrics  -> {run_dir / 'metrics.jsonl'}")
    out.print(f"loss     -> {run_dir / 'loss_table.md'}, {run_dir / 'loss.png'}")
    return result


def _f(x) -> str:
    return f"{x:.4f}" if x is not None else "-"


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


@app.command("train")
def train_cmd(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    skip_invalid: SkipOpt = False,
) -> None:
    """Fine-tune with QLoRA (prepares the data first when the run directory has none)."""
    r = _load(recipe, set_)
    _train(r, _run_dir(r, run_dir), resume, overwrite, skip_invalid)


@app.command("run")
def run_cmd(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    skip_invalid: SkipOpt = False,
) -> None:
    """Run every stage in one go: prepare, then train."""
    r = _load(recipe, set_)
    rd = _run_dir(r, run_dir)
    if not resume:
        from .train import check_fresh

        try:
            check_fresh(rd, overwrite)  # before prepare touches data/ of an earlier run
        except RecipeError as exc:
            _fail(str(exc))
        _prepare(r, rd, skip_invalid)
    _train(r, rd, resume, overwrite, skip_invalid)
    out.print(f"run      -> {rd}")


if __name__ == "__main__":  # pragma: no cover
    app()
