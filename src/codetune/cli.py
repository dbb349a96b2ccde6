"""The ``codetune`` command line. It only parses arguments and calls the stages."""

from __future__ import annotations

import os
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


def _source_recipe(source: str, recipe: str, overrides: list[str] | None) -> Recipe:
    """A run directory's own recipe, else the named one (its model is replaced by SOURCE when loading)."""
    saved = Path(source) / "recipe.yaml"
    return _load(str(saved) if saved.is_file() else recipe, overrides)


SourceArg = Annotated[str, typer.Argument(help="A run directory, a merged model folder or a hub id")]
RecipeOpt = Annotated[
    str, typer.Option("--recipe", help="For a model folder or hub id: the recipe whose settings apply")
]


def _print_summary(summary: dict) -> None:
    from .evaluate import ROUGE_TYPES

    results = summary["results"]
    models = list(results)
    table = Table("suite", "metric", *models, title="evaluation")
    suites = [s for s in summary["suites"]]
    for suite in suites:
        keys = (
            list(ROUGE_TYPES)
            if suite == "rouge"
            else sorted({k for r in results.values() for k in r.get(suite, {}) if k.startswith("pass@")})
        )
        for key in [*keys, "parse_rate"]:
            cells = [f"{results[m][suite][key]:.2f}" if key in results[m].get(suite, {}) else "-" for m in models]
            table.add_row(suite, key, *cells)
    out.print(table)


@app.command("eval")
def eval_cmd(
    source: Annotated[str | None, typer.Argument(help="A run directory, a merged model folder or a hub id")] = None,
    suite: Annotated[
        list[str] | None,
        typer.Option("--suite", help="rouge, humaneval, mbpp, starter, starter-family, starter-novel (repeatable)"),
    ] = None,
    compare_base: Annotated[bool, typer.Option(help="Also score the base model without the adapter")] = False,
    completions: Annotated[
        Path | None, typer.Option(help="Score completions made elsewhere: JSON lines with task_id, completion")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Default: RUN_DIR/eval")] = None,
    recipe: RecipeOpt = "phi3-mini-python",
    set_: SetOpt = None,
) -> None:
    """Score a model: ROUGE as the reference card did, and pass@k of executed tests in a sandbox."""
    from .data import DataError
    from .evaluate import evaluate, score_completions_file

    try:
        if completions is not None:
            if not suite or len(suite) != 1:
                _fail("--completions needs exactly one --suite (humaneval, mbpp or starter)")
            r = _load(recipe, set_)
            summary = score_completions_file(
                completions, suite[0], recipe=r, out_dir=out_dir or completions.with_suffix(""), console=console
            )
            out_dir = out_dir or completions.with_suffix("")
        else:
            if source is None:
                _fail("give a SOURCE to evaluate, or --completions FILE")
            r = _source_recipe(source, recipe, set_)
            summary = evaluate(
                source,
                suite or r.evaluation.suites,
                recipe=r,
                out_dir=out_dir,
                compare_base=compare_base or (r.evaluation.compare_base and (Path(source) / "adapter").is_dir()),
                console=console,
            )
            out_dir = out_dir or Path(source) / "eval"
    except (RecipeError, DataError) as exc:
        _fail(str(exc))
        return
    _print_summary(summary)
    out.print(f"results  -> {out_dir}")


@app.command("generate")
def generate_cmd(
    source: SourceArg,
    prompt: Annotated[str | None, typer.Option(help="One prompt (a user turn)")] = None,
    file: Annotated[Path | None, typer.Option(help="JSON lines with a prompt or messages each")] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Where --file's answers go (JSON lines)")] = None,
    recipe: RecipeOpt = "phi3-mini-python",
    set_: SetOpt = None,
) -> None:
    """Answer one prompt, or a file of prompts written to JSON lines."""
    from .data import DataError, read_jsonl, write_jsonl
    from .generate import generate, load_for_inference

    if (prompt is None) == (file is None):
        _fail("give exactly one of --prompt TEXT or --file PROMPTS.jsonl")
    r = _source_recipe(source, recipe, set_)
    convs: list[list[dict]] = []
    if file is not None:
        if not file.is_file():
            _fail(f"--file: {file} does not exist")
        try:
            rows = read_jsonl(file)
        except DataError as exc:
            _fail(str(exc))
        for obj in rows:
            lineno = obj["__row__"]
            if isinstance(obj.get("messages"), list):
                convs.append(obj["messages"])
            elif isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
                convs.append([{"role": "user", "content": obj["prompt"]}])
            else:
                _fail(f"{file}, row {lineno}, field 'prompt': missing or empty (or give 'messages')")
    else:
        convs = [[{"role": "user", "content": prompt}]]
    try:
        loaded = load_for_inference(source, recipe=r)
        answers = generate(
            loaded.model,
            loaded.tokenizer,
            convs,
            loaded.recipe.generation,
            batch_size=loaded.recipe.evaluation.batch_size,
        )
    except RecipeError as exc:
        _fail(str(exc))
        return
    if file is None:
        out.print(answers[0], highlight=False, markup=False)
        return
    target = out_file or file.with_name(file.stem + ".completions.jsonl")
    write_jsonl(target, [{"messages": c, "completion": a} for c, a in zip(convs, answers, strict=True)])
    out.print(f"{len(answers)} answers -> {target}")


@app.command("chat")
def chat_cmd(source: SourceArg, recipe: RecipeOpt = "phi3-mini-python", set_: SetOpt = None) -> None:
    """Talk to a model; its answers stream as they are generated. /reset starts over, /exit (or Ctrl-D) ends."""
    from .generate import load_for_inference, stream

    r = _source_recipe(source, recipe, set_)
    try:
        loaded = load_for_inference(source, recipe=r)
    except RecipeError as exc:
        _fail(str(exc))
        return
    history: list[dict] = []
    console.print("chat: /reset starts over, /exit ends", highlight=False)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        parts = []
        print("model> ", end="", flush=True)
        try:
            for piece in stream(loaded.model, loaded.tokenizer, history, loaded.recipe.generation):
                parts.append(piece)
                print(piece, end="", flush=True)
        except RecipeError as exc:
            print()
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": "".join(parts).strip()})


RunDirArg = Annotated[Path, typer.Argument(help="A run directory (recipe.yaml, adapter/)")]


@app.command("merge")
def merge_cmd(
    run_dir: RunDirArg,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Default: RUN_DIR/merged")] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32")] = "bfloat16",
) -> None:
    """Fold the adapter into the unquantized base model: one folder any tool can load."""
    from .export import merge

    if dtype not in ("bfloat16", "float16", "float32"):
        _fail(f"--dtype {dtype!r}: use bfloat16, float16 or float32")
    try:
        path = merge(run_dir, out_dir, dtype=dtype, log=lambda m: console.print(m, highlight=False))
    except RecipeError as exc:
        _fail(str(exc))
        return
    out.print(f"merged   -> {path}")


@app.command("export")
def export_cmd(
    run_dir: RunDirArg,
    format_: Annotated[str, typer.Option("--format", help="gguf (llama.cpp, Ollama)")] = "gguf",
    out_file: Annotated[Path | None, typer.Option("--out", help="Default: RUN_DIR/model-OUTTYPE.gguf")] = None,
    outtype: Annotated[str, typer.Option(help="f16, bf16, f32 or q8_0")] = "f16",
) -> None:
    """Export a fine-tune for llama.cpp / Ollama: merged first (bf16 base + adapter), then written as GGUF."""
    from .export import MERGED, merge
    from .gguf_export import export_gguf

    if format_ != "gguf":
        _fail(f"--format {format_!r}: only gguf is supported")
    try:
        merged = run_dir / MERGED
        if not (merged / "config.json").is_file():
            merge(run_dir, merged, log=lambda m: console.print(m, highlight=False))
        path = export_gguf(merged, out_file or run_dir / f"model-{outtype}.gguf", outtype=outtype)
    except RecipeError as exc:
        _fail(str(exc))
        return
    out.print(f"gguf     -> {path}")


@app.command("card")
def card_cmd(
    run_dir: RunDirArg,
    repo_id: Annotated[str | None, typer.Option(help="The hub repo the card will live in (for its snippet)")] = None,
) -> None:
    """Write RUN_DIR/README.md: a Hugging Face model card with the run's real numbers."""
    from .card import write_card

    try:
        path = write_card(run_dir, repo_id=repo_id)
    except RecipeError as exc:
        _fail(str(exc))
        return
    out.print(f"card     -> {path}")


@app.command("push")
def push_cmd(
    run_dir: RunDirArg,
    repo_id: Annotated[str, typer.Option(help="OWNER/NAME on the Hugging Face hub")],
    private: Annotated[bool, typer.Option(help="Create the repo private")] = False,
) -> None:
    """Upload the adapter, the model card and the plots to the Hugging Face hub."""
    from .card import push

    try:
        url = push(run_dir, repo_id, private=private)
    except RecipeError as exc:
        _fail(str(exc))
        return
    out.print(f"pushed   -> {url}")


@app.command("serve")
def serve_cmd(
    source: SourceArg,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="CODETUNE_API_KEY", help="Require 'Authorization: Bearer KEY'")
    ] = None,
    name: Annotated[str | None, typer.Option(help="The model id clients ask for (default: the folder name)")] = None,
    max_tokens_limit: Annotated[int, typer.Option(help="The largest max_tokens a request may ask")] = 1024,
    engine: Annotated[str, typer.Option(help="hf (this process) or vllm (vLLM's OpenAI server)")] = "hf",
    dry_run: Annotated[bool, typer.Option(help="With --engine vllm: print the command, do not start it")] = False,
    recipe: RecipeOpt = "phi3-mini-python",
    set_: SetOpt = None,
) -> None:
    """An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health."""
    import shlex
    import shutil

    from .serve import create_app, load_engine, vllm_command

    if engine == "vllm":
        try:
            cmd = vllm_command(
                source, host=host, port=port, name=name, api_key=api_key, max_tokens_limit=max_tokens_limit
            )
        except RecipeError as exc:
            _fail(str(exc))
            return
        line = shlex.join(cmd)
        if dry_run:
            out.print(line, highlight=False, markup=False, soft_wrap=True)
            return
        if shutil.which("vllm") is None:
            _fail(f"vLLM is not installed here (pip install vllm; it needs a CUDA GPU). The command would be:\n{line}")
        os.execvp(cmd[0], cmd)
    if engine != "hf":
        _fail(f"--engine {engine!r}: use hf or vllm")
    import uvicorn

    try:
        eng = load_engine(
            source, name=name, max_tokens_limit=max_tokens_limit, recipe=_source_recipe(source, recipe, set_)
        )
    except RecipeError as exc:
        _fail(str(exc))
        return
    console.print(
        f"serving {eng.name!r} on http://{host}:{port}/v1 (auth {'on' if api_key else 'off'})",
        highlight=False,
        markup=False,
    )
    uvicorn.run(create_app(eng, api_key=api_key), host=host, port=port, log_level="warning")


@app.command("run")
def run_cmd(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    skip_invalid: SkipOpt = False,
) -> None:
    """Run every stage in one go: prepare, train, evaluate on the recipe's suites, write the model card."""
    r = _load(recipe, set_)
    rd = _run_dir(r, run_dir)
    if not resume:
        from .train import check_fresh

        try:
            check_fresh(rd, overwrite)  # before prepare touches data/ of an earlier run
        except RecipeError as exc:
            _fail(str(exc))
        _prepare(r, rd, skip_invalid)
    if _train(r, rd, resume, overwrite, skip_invalid) is None or not _is_main():
        return
    from .evaluate import evaluate

    try:
        summary = evaluate(rd, r.evaluation.suites, recipe=r, console=console, compare_base=r.evaluation.compare_base)
    except RecipeError as exc:
        _fail(str(exc))
    _print_summary(summary)
    out.print(f"results  -> {rd / 'eval'}")
    from .card import write_card

    out.print(f"card     -> {write_card(rd)}")
    out.print(f"run      -> {rd}")


if __name__ == "__main__":  # pragma: no cover
    app()
