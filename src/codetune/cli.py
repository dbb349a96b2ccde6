"""The ``codetune`` command line. It only parses arguments and calls the stages."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from .errors import CodetuneError, InputError
from .recipe import Recipe, load_recipe, shipped_recipes
from .rundir import RunDir
from .source import Source
from .suites import ROUGE_TYPES, executed_suites, get_suite, suite_names

HELP = "Fine-tune a small open LLM into a Python coder with QLoRA, and prove the gain by running the code it writes."


def _print_error(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)


class Terminated(BaseException):
    """SIGTERM, raised wherever the command is, so that it unwinds as Ctrl-C does: every staging folder
    and temporary file it had is removed on the way out (a BaseException: no ``except Exception`` stops it)."""


@contextmanager
def _sigterm_unwinds():
    """While a command runs, SIGTERM raises :class:`Terminated` in the main thread (the default would end
    the process at once and leave its staging folders behind)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Commands(TyperGroup):
    """The one error handler: bad input of any command is one ``error: ...`` line and exit code 2,
    never a traceback. CODETUNE_DEBUG=1 shows the traceback instead."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = 0
        try:
            with _sigterm_unwinds():
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except typer.TyperException as exc:  # usage errors: a bad option value, a missing argument
            if type(exc).__name__ == "NoArgsIsHelpError":  # `codetune` alone: the help, as before
                exc.show()
                code = 2
            else:
                _print_error(_escape(" ".join(exc.format_message().split())))
                code = exc.exit_code
        except typer.Abort:
            _print_error("aborted")
            code = 1
        except CodetuneError as exc:
            if os.environ.get("CODETUNE_DEBUG"):
                raise
            _print_error(_escape(str(exc)))
            code = 2
        except OSError as exc:  # a read-only folder, a full disk: name the file, no traceback
            if os.environ.get("CODETUNE_DEBUG"):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            _print_error(_escape(f"{where}{exc.strerror or exc}"))
            code = 2
        except KeyboardInterrupt:
            _print_error("interrupted")
            code = 130
        except Terminated:
            _print_error("terminated (SIGTERM): the output it was writing was removed, nothing was replaced")
            code = 128 + 15
        if standalone_mode:
            sys.exit(code)
        return code

    def get_params(self, ctx):
        _untyped_flags(self, ctx)
        return super().get_params(ctx)


def _untyped_flags(command, ctx) -> None:
    """A flag takes no value, so its help shows no type (typer would print ``--version <bool>``)."""
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _untyped_flags(sub, ctx)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


app = typer.Typer(
    cls=_Commands, no_args_is_help=True, add_completion=False, help=HELP, pretty_exceptions_show_locals=False
)
recipe_app = typer.Typer(no_args_is_help=True, help="Inspect recipes.")
app.add_typer(recipe_app, name="recipe")
console = Console(stderr=True, soft_wrap=True)  # log lines stay whole in a log file
# Piped, rich would wrap at 80 columns; soft_wrap keeps a long line one line.
out = Console(soft_wrap=True)


def _emit(text: str) -> None:
    """Machine-readable output (YAML, code, a path, a command): exactly these characters, never wrapped or styled."""
    import sys

    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


RecipeArg = Annotated[str, typer.Argument(help="A shipped recipe name (see `codetune recipes`) or a .yaml file")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", metavar="FIELD=VALUE", help="Override a field: --set training.learning_rate=2e-4 (repeatable)"
    ),
]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", "-o", help="Default: runs/<recipe name>")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue from the run directory's last complete checkpoint")]
OverwriteOpt = Annotated[bool, typer.Option(help="Delete the run directory's earlier training and start over")]
ReplaceOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing output, only when codetune wrote it (same kind)")
]
SkipOpt = Annotated[bool, typer.Option(help="Set bad rows aside in data/rejected.jsonl")]


def _fail(message: str) -> None:
    raise InputError(message)


def _check_text(option: str, value: str) -> None:
    """A text option must be text: a byte that is not UTF-8 (``$'\\xff'``) arrives as a lone surrogate."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        _fail(f"{option}: not UTF-8 text (a byte that is not UTF-8 at character {exc.start}); give UTF-8 text")


def _load(recipe: str, overrides: list[str] | None) -> Recipe:
    return load_recipe(recipe, _overrides(overrides, recipe))


def _section(item: str) -> str:
    return item.split("=", 1)[0].strip().split(".", 1)[0]


def _overrides(set_: list[str] | None, recipe: str | None = None) -> list[str]:
    """The ``--set`` items of a command that starts from a RECIPE: those in the environment variable
    CODETUNE_SET first (separated by spaces, quoted as in a shell), then the command's own. For a quick
    run of every command as written, ``CODETUNE_SET='training.max_steps=8'`` (tests/test_readme.py).

    CODETUNE_SET's ``rl.*`` items apply only to a recipe that has an ``rl:`` section (its own or from the
    command's ``--set``): a quick setting shortens GRPO where there is one, and never adds the stage."""
    import shlex

    try:
        extra = shlex.split(os.environ.get("CODETUNE_SET", ""))
    except ValueError as exc:
        raise InputError(f"CODETUNE_SET: {exc}: give FIELD=VALUE items separated by spaces") from None
    own = list(set_ or [])
    if recipe is not None and any(_section(i) == "rl" for i in extra) and not _has_rl(recipe, own):
        extra = [i for i in extra if _section(i) != "rl"]
    if extra and os.environ.get("LOCAL_RANK", "0") == "0":  # once under `accelerate launch`
        console.print(f"note: CODETUNE_SET adds --set {' '.join(extra)}", highlight=False, markup=False)
    return [*extra, *own]


def _has_rl(recipe: str, own: list[str]) -> bool:
    try:
        return load_recipe(recipe, own, resolve=False).rl is not None
    except CodetuneError:
        return True  # the real load names what is wrong


def _version(value: bool) -> None:
    if value:
        from .version import __version__

        _emit(f"codetune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    _quiet_libraries()


def _quiet_libraries() -> None:
    """codetune reports progress itself; the libraries' own bars, notices and deprecation chatter would bury it."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .generate import ContextWarning

    show = warnings.showwarning
    if getattr(show, "codetune", False):
        return

    def one_line(message, category, *args, **kwargs):
        # a warning about the user's input is one line, like an error, not a source excerpt
        if issubclass(category, ContextWarning):
            console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
        else:
            show(message, category, *args, **kwargs)

    one_line.codetune = True
    warnings.showwarning = one_line


@app.command("recipes")
def recipes_cmd() -> None:
    """List the shipped recipes."""
    table = Table("recipe", "description", title="shipped recipes")
    for name, desc in shipped_recipes().items():
        table.add_row(name, desc)
    out.print(table)


@recipe_app.command("show")
def recipe_show(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Print a recipe fully resolved (defaults filled in, overrides applied) as YAML; a field left to the
    model's family says `family`, with its value and the family as a comment."""
    from .recipe import annotated_yaml

    _emit(annotated_yaml(load_recipe(recipe, _overrides(set_, recipe), resolve=False)))


def _print_prepared(result) -> None:
    s = result.stats
    rows, tokens, pad = s["rows"], s["tokens"]["train"], s["padding"]
    table = Table("", "", title=f"prepared {s['recipe']}", show_header=False)
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
    _emit(str(entry))


@app.command("prepare")
def prepare_cmd(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    skip_invalid: SkipOpt = False,
    overwrite: Annotated[
        bool, typer.Option(help="Re-prepare a run that has trained: its earlier training is deleted")
    ] = False,
) -> None:
    """Check, format, split, deduplicate, decontaminate and tokenize the recipe's data."""
    result = _pipeline(recipe, run_dir, set_, ("prepare",), overwrite=overwrite, skip_invalid=skip_invalid)
    _print_prepared(result.prepared)


def _pipeline(recipe: str, run_dir: Path | None, set_: list[str] | None, stages, **kwargs):
    from .pipeline import run

    return run(recipe, run_dir, overrides=_overrides(set_, recipe), stages=stages, console=console, **kwargs)


def _print_trained(result) -> None:
    s = result.summary
    if s["world_size"] > 1 and not _is_main():
        return
    rd = RunDir(result.run_dir)
    table = Table("", "", title=f"trained {s['recipe']}", show_header=False)
    table.add_row("optimizer steps", str(s["global_step"]))
    table.add_row("last training / validation loss", f"{_f(s['last_train_loss'])} / {_f(s['last_eval_loss'])}")
    table.add_row("tokens seen", f"{s['tokens']:,}")
    table.add_row("trainable parameters", f"{s['trainable_parameters']:,}")
    table.add_row("wall time", f"{s['wall_s_this_session']:.1f} s")
    out.print(table)
    out.print(f"adapter  -> {result.adapter_dir}")
    out.print(f"metrics  -> {rd.metrics}")
    out.print(f"loss     -> {rd.loss_table}, {rd.loss_plot}")


def _f(x) -> str:
    return f"{x:.4f}" if x is not None else "-"


def _is_main() -> bool:
    from .train import process_state

    return process_state().is_main_process


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
    result = _pipeline(recipe, run_dir, set_, ("train",), resume=resume, overwrite=overwrite, skip_invalid=skip_invalid)
    _print_trained(result.trained)


def _source(
    source: str, recipe: str | None, overrides: list[str] | None, stage: str = "sft"
) -> tuple[Source, Recipe]:
    """SOURCE resolved (a run's ``stage`` adapter), and the recipe whose settings apply (``Source.recipe``)."""
    src = Source.of(source, stage=stage)
    return src, src.recipe(recipe, overrides or [])


class AdapterStage(str, Enum):
    sft = "sft"
    rl = "rl"


AdapterOpt = Annotated[
    AdapterStage,
    typer.Option(
        "--adapter",
        help="A run's adapter: sft (adapter/, results in eval/) or rl (rl/adapter from codetune rl, results in rl/eval/)",
    ),
]


SourceArg = Annotated[str, typer.Argument(help="A run directory, a merged model folder or a hub id")]
RecipeOpt = Annotated[
    str | None,
    typer.Option(
        "--recipe",
        help="For a model folder or hub id: the recipe whose settings apply (default: its model family's)",
    ),
]


def _print_summary(summary: dict) -> None:
    from .evaluate import suite_info, suite_label

    results = summary["results"]
    models = list(results)
    table = Table("suite", "metric", *models, title="evaluation")
    suites = [s for s in summary["suites"]]
    for suite in suites:
        keys = (
            list(ROUGE_TYPES)
            if suite in suite_names() and get_suite(suite).scoring == "rouge"
            else sorted({k for r in results.values() for k in r.get(suite, {}) if k.startswith("pass@")})
        )
        for key in [*keys, "parse_rate"]:
            cells = [f"{results[m][suite][key]:.2f}" if key in results[m].get(suite, {}) else "-" for m in models]
            table.add_row(suite_label(suite, suite_info(results, suite)), key, *cells)
    out.print(table)


@app.command("eval")
def eval_cmd(
    source: Annotated[str | None, typer.Argument(help="A run directory, a merged model folder or a hub id")] = None,
    suite: Annotated[
        list[str] | None,
        typer.Option("--suite", help=f"{', '.join(suite_names())} (repeatable; codetune.suites)"),
    ] = None,
    compare_base: Annotated[
        bool | None,
        typer.Option("--compare-base/--no-compare-base", help="Also score the base model (default: the recipe's)"),
    ] = None,
    completions: Annotated[
        Path | None, typer.Option(help="Score completions made elsewhere: JSON lines with task_id, completion")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Default: RUN_DIR/eval; with --completions, runs/eval-<file stem>")
    ] = None,
    overwrite: ReplaceOpt = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    adapter: AdapterOpt = AdapterStage.sft,
) -> None:
    """Score a model: ROUGE as the reference card did, and pass@k of executed tests in a sandbox."""
    from .evaluate import completions_out_dir, evaluate, score_completions_file

    if completions is not None:
        if source is not None:
            _fail("give a SOURCE to evaluate or --completions FILE, not both")
        if not suite or len(suite) != 1:
            _fail(f"--completions needs exactly one --suite ({', '.join(executed_suites())})")
        r = load_recipe(recipe, set_ or []) if recipe is not None else None
        summary = score_completions_file(
            completions, suite[0], recipe=r, out_dir=out_dir, overwrite=overwrite, console=console
        )
        out_dir = out_dir or completions_out_dir(completions)
    else:
        if source is None:
            _fail("give a SOURCE to evaluate, or --completions FILE")
        src, r = _source(source, recipe, set_, adapter.value)
        summary = evaluate(  # out_dir None: the run's eval/, or rl/eval/ (a model folder or hub id needs --out)
            src,
            suite or r.evaluation.suites,
            recipe=r,
            out_dir=out_dir,
            overwrite=overwrite,
            compare_base=compare_base,
            console=console,
        )
        out_dir = out_dir or src.run.eval
    _print_summary(summary)
    out.print(f"results  -> {out_dir}")


@app.command("generate")
def generate_cmd(
    source: SourceArg,
    prompt: Annotated[str | None, typer.Option(help="One prompt (a user turn)")] = None,
    file: Annotated[Path | None, typer.Option(help="JSON lines with a prompt or messages each")] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Where --file's answers go (JSON lines)")] = None,
    overwrite: ReplaceOpt = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    adapter: AdapterOpt = AdapterStage.sft,
) -> None:
    """Answer one prompt, or a file of prompts written to JSON lines."""
    from .data import read_prompts, write_jsonl_new
    from .generate import load_session

    if (prompt is None) == (file is None):
        _fail("give exactly one of --prompt TEXT or --file PROMPTS.jsonl")
    if prompt is not None:
        _check_text("--prompt", prompt)
    src, r = _source(source, recipe, set_, adapter.value)
    if file is not None:
        convs = read_prompts(file)
        target = out_file or file.with_name(file.stem + ".completions.jsonl")
        write_jsonl_new(target, None, overwrite=overwrite, protect=[file], check_only=True)  # refuse before generating
    else:
        convs = [[{"role": "user", "content": prompt}]]
    answers = load_session(src, recipe=r).generate(convs)
    if file is None:
        _emit(answers[0])
        return
    rows = [{"messages": c, "completion": a} for c, a in zip(convs, answers, strict=True)]
    write_jsonl_new(target, rows, overwrite=overwrite, protect=[file])
    out.print(f"{len(answers)} answers -> {target}")


@app.command("chat")
def chat_cmd(source: SourceArg, recipe: RecipeOpt = None, set_: SetOpt = None) -> None:
    """Talk to a model; its answers stream as they are generated. /reset starts over, /exit (or Ctrl-D) ends."""
    from .generate import load_session

    src, r = _source(source, recipe, set_)
    session = load_session(src, recipe=r)
    from .chat_input import converse, turns

    def say(message: str) -> None:
        console.print(message, highlight=False, markup=False)

    say(
        "chat: Enter sends, Alt-Enter adds a line, a ``` fence keeps code in one message; "
        "/reset starts over, /exit ends"
    )
    converse(session, turns(), note=say, error=lambda message: _print_error(_escape(message)))


RunDirArg = Annotated[Path, typer.Argument(help="A run directory (recipe.yaml, adapter/)")]


@app.command("merge")
def merge_cmd(
    run_dir: RunDirArg,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Default: RUN_DIR/merged")] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32")] = "bfloat16",
    overwrite: ReplaceOpt = False,
) -> None:
    """Fold the adapter into the unquantized base model: one folder any tool can load."""
    from .export import merge

    if dtype not in ("bfloat16", "float16", "float32"):
        _fail(f"--dtype {dtype!r}: use bfloat16, float16 or float32")
    path = merge(run_dir, out_dir, dtype=dtype, overwrite=overwrite, log=lambda m: console.print(m, highlight=False))
    out.print(f"merged   -> {path}")


def _format_help() -> str:
    from .export import FORMATS

    return "; ".join(f"{f.name}: {f.writes}" for f in FORMATS.values())


def _outtype_help() -> str:
    from .export import FORMATS

    return "; ".join(f"{f.name}: {', '.join(f.outtypes)} (default {f.default_outtype})" for f in FORMATS.values())


@app.command("export")
def export_cmd(
    run_dir: RunDirArg,
    format_: Annotated[str, typer.Option("--format", help=_format_help())] = "gguf",
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Default: RUN_DIR/model-OUTTYPE.gguf (gguf), RUN_DIR/merged (merged)")
    ] = None,
    outtype: Annotated[str | None, typer.Option(help=_outtype_help())] = None,
    overwrite: ReplaceOpt = False,
) -> None:
    """Export a fine-tune: for llama.cpp / Ollama as GGUF (merged first), or as a merged model folder."""
    from .export import export

    path = export(
        run_dir,
        out_file,
        format=format_,
        outtype=outtype,
        overwrite=overwrite,
        log=lambda m: console.print(m, highlight=False),
    )
    out.print(f"{format_:<8} -> {path}")


@app.command("rl")
def rl_cmd(run_dir: RunDirArg, set_: SetOpt = None, resume: ResumeOpt = False) -> None:
    """GRPO on a trained run's adapter, rewarded by the sandbox's verdict (writes RUN_DIR/rl/; docs/rl.md)."""
    from .rl import rl

    other = [o for o in set_ or [] if _section(o) != "rl"]
    if other:
        _fail(f"--set {other[0]!r}: a trained run keeps its recipe; `codetune rl` takes rl.* settings only")
    # CODETUNE_SET's other items are for the other stages
    overrides = [o for o in _overrides(set_) if _section(o) == "rl"]
    rd = RunDir(run_dir)
    rd.require_adapter()
    recipe = load_recipe(rd.recipe_file)
    if overrides:
        recipe = load_recipe(recipe, overrides)
    result = rl(recipe, run_dir, console=console, resume=resume)
    out.print(f"rl       -> {result.adapter} ({result.steps} steps on {result.tasks} tasks, {result.wall_s:.0f} s)")


@app.command("card")
def card_cmd(
    run_dir: RunDirArg,
    repo_id: Annotated[str | None, typer.Option(help="The hub repo the card will live in (for its snippet)")] = None,
    overwrite: ReplaceOpt = False,
) -> None:
    """Write RUN_DIR/README.md: a Hugging Face model card with the run's real numbers."""
    from .card import write_card

    path = write_card(run_dir, repo_id=repo_id, overwrite=overwrite)
    out.print(f"card     -> {path}")


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (or an `eval --out` folder)")],
    out_file: Annotated[Path | None, typer.Option("--out", help=f"Default: RUN_DIR/{RunDir.REPORT}")] = None,
    overwrite: ReplaceOpt = False,
) -> None:
    """Write RUN_DIR/report.html: loss curves, base vs fine-tuned scores and every sample, in one offline page."""
    from .report import write_report

    path = write_report(run_dir, out_file, overwrite=overwrite)
    out.print(f"report   -> {path}", highlight=False)


@app.command("push")
def push_cmd(
    run_dir: RunDirArg,
    repo_id: Annotated[str, typer.Option(help="OWNER/NAME on the Hugging Face hub")],
    private: Annotated[bool, typer.Option(help="Create the repo private")] = False,
) -> None:
    """Upload the adapter, the model card and the plots to the Hugging Face hub."""
    from .card import push

    url = push(run_dir, repo_id, private=private)
    out.print(f"pushed   -> {url}")


@app.command("serve")
def serve_cmd(
    source: SourceArg,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on", min=1, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="CODETUNE_API_KEY", help="Require 'Authorization: Bearer KEY' on every route but /health"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="The model id clients ask for (default: the folder name)")] = None,
    max_tokens_limit: Annotated[int, typer.Option(min=1, help="The largest max_tokens a request may ask")] = 1024,
    max_request_bytes: Annotated[
        int, typer.Option(min=1, help="Larger request bodies get a 413 before they are read")
    ] = 4 * 1024 * 1024,
    max_connections: Annotated[int, typer.Option(min=1, help="Open connections past this get a 503 at once")] = 100,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="Another Host name clients use (default: the --host address; any, for 0.0.0.0)"),
    ] = None,
    engine: Annotated[str, typer.Option(help="hf (this process) or vllm (vLLM's OpenAI server)")] = "hf",
    vllm: Annotated[
        str | None, typer.Option(help="With --engine vllm: vLLM's own environment or its vllm executable")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="With --engine vllm: print the command, do not start it")] = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health."""
    from .serve import allowed_hosts_for, bind, create_app, load_engine, run_server

    if engine == "vllm":
        return _serve_vllm(source, host, port, name, api_key, max_tokens_limit, vllm, dry_run)
    if engine != "hf":
        _fail(f"--engine {engine!r}: use hf or vllm")
    sock = bind(host, port)  # a port in use is an error before the model loads and before anything is announced
    src, r = _source(source, recipe, set_)
    eng = load_engine(src, name=name, max_tokens_limit=max_tokens_limit, recipe=r)
    hosts = allowed_hosts_for(host, allowed_host)
    app_ = create_app(eng, api_key=api_key, max_request_bytes=max_request_bytes, allowed_hosts=hosts)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    console.print(
        f"serving {eng.name!r} on {url}/v1 (auth {'on' if api_key else 'off'}); report at {url}/, chat at {url}/chat",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    run_server(app_, sock, max_connections=max_connections)


def _serve_vllm(source, host, port, name, api_key, max_tokens_limit, vllm, dry_run) -> None:
    """``serve --engine vllm``: vLLM's own server, from vLLM's own environment (never codetune's)."""
    import shlex

    from .errors import CodetuneError
    from .serve import find_vllm, vllm_command

    cmd = vllm_command(source, host=host, port=port, name=name, api_key=api_key, max_tokens_limit=max_tokens_limit)
    try:
        cmd[0] = str(find_vllm(vllm))
    except CodetuneError as exc:
        if not dry_run:
            raise
        console.print(f"note: {exc}", highlight=False, markup=False, soft_wrap=True)
    if dry_run:
        _emit(shlex.join(cmd))
        return
    os.execv(cmd[0], cmd)


@app.command("run")
def run_cmd(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    skip_invalid: SkipOpt = False,
) -> None:
    """Run every stage in one go: prepare, train, GRPO when the recipe has rl:, evaluate on the recipe's suites,
    write the model card."""
    from .pipeline import STAGES

    result = _pipeline(recipe, run_dir, set_, STAGES, resume=resume, overwrite=overwrite, skip_invalid=skip_invalid)
    _print_run(result)


def _print_run(result) -> None:
    """What ``codetune run`` made: the training's table, the scores (SFT's, then GRPO's), where things are."""
    if result.trained is not None:
        _print_trained(result.trained)
    if result.summary is None:  # not the main process
        return
    _print_summary(result.summary)
    out.print(f"results  -> {RunDir(result.run_dir).eval}")
    if result.rl is not None:
        out.print(f"rl       -> {result.rl.adapter} ({result.rl.steps} steps on {result.rl.tasks} tasks)")
    if result.rl_summary is not None:
        out.print("after GRPO (rl/adapter):")
        _print_summary(result.rl_summary)
        out.print(f"results  -> {RunDir(result.run_dir).rl_eval}")
    out.print(f"card     -> {result.card}")
    out.print(f"run      -> {result.run_dir}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
