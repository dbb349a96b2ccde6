"""``codetune eval``: have a model answer a suite's tasks, score them, and keep the results per suite.

The suites are the modules of ``codetune.suites``, one each (``rouge``, ``humaneval``, ``mbpp``,
``starter``, ``starter-family``, ``starter-novel``): each declares its tasks, their prompt (one user turn,
rendered with the model's chat template) and how it is scored (``codetune.suites.score_suite``: ROUGE as
the reference card computed it, or pass@k of the code executed in the sandbox). This module orchestrates:
it loads the model once, generates, scores, and merges the results with the earlier ones of the same model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .data import _heldout_record, known_trained_ids, read_jsonl
from .errors import InputError, OutputError
from .generate import InferenceSession, load_for_inference
from .model import disable_avx512_bf16_path, load_base_model
from .recipe import Recipe, RecipeError, load_recipe
from .rundir import (
    EVAL_SUMMARY,
    RunDir,
    check_target,
    file_problem,
    is_regular_file,
    model_fingerprint,
    ours_or_legacy,
    run_of_eval,
    staged_dir,
)
from .runfiles import EVAL_FIX, read_eval_summary
from .source import Source
from .suites import (
    REGISTRY,
    ROUGE_TYPES,
    Reporter,
    Task,
    all_suites,
    check_sandbox,
    executed_suites,
    get_suite,
    score_suite,
    suite_names,
)

# ---------------------------------------------------------------------------------------
# Tasks


def from_starter(suite: str) -> bool:
    """A suite that leaves out the tasks the model trained on (the starter suites): its scores say whether
    that was known. False for a suite no longer registered (an old summary's)."""
    return suite in REGISTRY and REGISTRY[suite].held_out


def suite_label(suite: str, info: dict | None) -> str:
    """The suite's name as every table shows it: a partial suite says so with its task count, and a
    starter suite whose tasks are not known to be held out says that."""
    info = info or {}
    notes = []
    if info.get("partial"):
        notes.append(f"partial: {info.get('tasks')} of {info.get('tasks_in_suite')} tasks")
    if from_starter(suite) and info.get("held_out") is False:
        notes.append("not known to be held out")
    return f"{suite} ({'; '.join(notes)})" if notes else suite


def suite_info(results: dict[str, dict], suite: str) -> dict:
    """The first model's entry for ``suite`` (every model of one evaluation scores the same tasks)."""
    return next((r[suite] for r in results.values() if isinstance(r, dict) and suite in r), {})


def load_tasks(suite: str, recipe: Recipe, run_dir: Path | None) -> list[Task]:
    """The suite's tasks for the model in ``run_dir`` (a run directory or model folder; None: unknown)."""
    return get_suite(suite).load(recipe, run_dir)


# ---------------------------------------------------------------------------------------
# The stage


def generate_completions(
    session, tasks: list[Task], recipe: Recipe, console=None, batch_size: int | None = None
) -> list[list[str]]:
    """``evaluation.n_samples`` answers per task from an :class:`~codetune.generate.InferenceSession`, in
    ``evaluation.order``: fast (sorted, batched, in waves) or the reference notebook's (one at a time, in task
    order, after ``set_seed`` and a warm-up generation)."""
    n = recipe.evaluation.n_samples
    convs = [t.prompt for t in tasks for _ in range(n)]
    reporter = Reporter(console, "generate", len(convs))
    if recipe.evaluation.order == "reference":
        answers = session.generate_in_order(convs, recipe.generation, on_batch=lambda k: reporter.advance(k))
    else:
        answers = session.generate(
            convs,
            recipe.generation,
            batch_size=batch_size or recipe.evaluation.batch_size,
            on_batch=lambda k: reporter.advance(k),
        )
    reporter.close()
    return [answers[i * n : (i + 1) * n] for i in range(len(tasks))]


def _cell(value, spec: str) -> str:
    """A score in a table; "—" where there is none."""
    return format(value, spec) if isinstance(value, int | float) and not isinstance(value, bool) else "—"


def summary_markdown(results: dict[str, dict[str, dict]], title: str) -> str:
    """One table per kind of score; a column per model (fine-tuned, base)."""
    models = list(results)
    lines = [f"# {title}", ""]
    for name in (s.name for s in all_suites() if s.scoring == "rouge"):
        rouge = {m: r[name] for m, r in results.items() if name in r}
        if not rouge:
            continue
        lines += [
            f"## ROUGE{'' if name == 'rouge' else f' of {name}'} (F-measure x 100, mean over samples)",
            "",
            "| metric | " + " | ".join(rouge) + " |",
            "|---|" + "---:|" * len(rouge),
        ]
        for t in ROUGE_TYPES:
            lines.append(f"| {t} | " + " | ".join(_cell(rouge[m].get(t), ".2f") for m in rouge) + " |")
        lines.append("")
    suites = [s for s in executed_suites() if any(s in r for r in results.values())]
    if suites:
        lines += [
            "## Executed tests (pass@k, %)",
            "",
            "| suite | metric | " + " | ".join(models) + " |",
            "|---|---|" + "---:|" * len(models),
        ]
        for s in suites:
            metrics = sorted(
                {k for r in results.values() if s in r for k in r[s] if k.startswith("pass@")} | {"parse_rate"}
            )
            for metric in metrics:
                cells = [_cell(results[m].get(s, {}).get(metric), ".1f") for m in models]
                lines.append(f"| {suite_label(s, suite_info(results, s))} | {metric} | " + " | ".join(cells) + " |")
        lines.append("")
        levels = sorted({str(r[s].get("sandbox")) for r in results.values() for s in suites if s in r})
        lines += [f"Tests executed in codetune's sandbox, isolation level: {', '.join(levels)}.", ""]
    return "\n".join(lines)


def evaluate(
    source: str | Path | Source,
    suites: list[str],
    *,
    recipe: Recipe | None = None,
    out_dir: Path | None = None,
    compare_base: bool | None = None,
    console=None,
    batch_size: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate a run directory (base + adapter), a merged model folder or a hub id on ``suites``.

    ``recipe``: the settings that apply (default: the source's, ``Source.recipe``). ``compare_base``: also
    score the base model without the adapter (default: the recipe's ``evaluation.compare_base`` for a run).

    Results accumulate per suite in ``out_dir``: the suites run now replace their own earlier results
    (re-scoring one needs ``overwrite``), the other suites stay, unless they were made from another
    adapter or model (then they are dropped, and a line says so). The folder is built in a fresh staging
    folder (the kept files copied in) and moved into place at the end; an existing ``out_dir`` is
    written only when it holds earlier codetune results."""
    src = Source.of(source)
    out_dir, rules = _out_dir(src, out_dir)
    unknown = [s for s in suites if s not in suite_names()]
    if unknown:
        raise RecipeError(f"unknown suite(s) {unknown}: choose from {', '.join(suite_names())}")
    recipe = recipe or src.recipe()
    compare_base = compare_base_for(recipe, src, compare_base)
    merged = src.run is not None and recipe.evaluation.model == "merged"
    if compare_base and src.run is None:
        raise RecipeError("--compare-base needs a run directory (base model + adapter)")
    made_from = _made_from(recipe, src, merged)
    earlier = _earlier_summary(out_dir, overwrite)
    kept = _kept_suites(earlier, made_from, suites, out_dir, overwrite, console, rules)
    with staged_dir(out_dir, "eval", **rules) as staging:
        # the staging folder exists from the start: an unwritable --out fails before any generation
        summary = _evaluate(src, suites, recipe, staging, compare_base, console, batch_size, merged)
        summary.update(made_from)
        for result in summary["results"].values():
            for suite in result.values():
                suite["adapter_sha256"] = made_from["adapter_sha256"]
        summary = _accumulate(summary, earlier, kept, out_dir, staging)
        _write_summary(staging, summary, f"Evaluation of {src}")
        return summary


def compare_base_for(recipe: Recipe, src: Source, asked: bool | None) -> bool:
    """Whether the base model is scored too: as asked, else the recipe's ``evaluation.compare_base`` for a
    run (a model folder or hub id has no adapter to switch off)."""
    if asked is not None:
        return asked
    return recipe.evaluation.compare_base and src.run is not None


def _out_dir(src: Source, out_dir: Path | None) -> tuple[Path, dict]:
    """Where the results go (a run's eval/ by default) and the rules for writing there, checked now,
    before the model loads: another run's eval/ is never one (only its own evaluation writes there)."""
    given = out_dir is not None
    if not given:
        if src.run is None:
            raise RecipeError("evaluating a model folder or hub id needs --out DIR for the results")
        out_dir = src.run.eval
    out_dir = Path(out_dir)
    owner = run_of_eval(out_dir)
    if owner is not None and (src.run is None or src.run.path.resolve() != owner.path.resolve()):
        _refuse_run_eval(out_dir, owner)
    protect = [src.path] if src.path is not None else []
    # an existing codetune eval folder is added to (what it may lose is checked per suite)
    rules = dict(overwrite=True, protect=protect, ours=_earlier_eval, **_out_words(given))
    check_target(out_dir, "eval", **rules)
    return out_dir, rules


def _out_words(given: bool) -> dict[str, str]:
    """How errors name the results folder: ``--out DIR`` when the user gave one, else the run's own folder,
    with ``--out`` offered as the way to write elsewhere."""
    if given:
        return {"what": "--out", "elsewhere": "choose another --out"}
    return {"what": "results folder", "elsewhere": "write the results elsewhere with --out DIR"}


def _evaluated(recipe: Recipe, src: Source, merged: bool) -> str:
    if merged:
        return f"adapter merged into the base in {recipe.quantization.compute_dtype}"
    if src.run is not None:
        return "base" + (" (4-bit)" if recipe.quantization.load_in_4bit else "") + " + adapter"
    return "model folder or hub id"


def _refuse_run_eval(out_dir: Path, owner: RunDir) -> None:
    raise OutputError(
        f"--out {out_dir} is in the evaluation folder of the run {owner.path}: it holds only what "
        f"`codetune eval {owner.path}` measured of that run's adapter (its card publishes them); choose another --out"
    )


def _made_from(recipe: Recipe, src: Source, merged: bool) -> dict[str, str | None]:
    """What the results are of, by content, never by where a folder sits (a moved run is the same model):
    how it was evaluated, the base model, and the adapter's SHA-256."""
    return {"model": _evaluated(recipe, src, merged), "base": _base(recipe, src), "adapter_sha256": _fingerprint(src)}


def _base(recipe: Recipe, src: Source) -> str:
    """A run's base model (hub id or builtin name, with its revision); a model folder's weights' SHA-256; a
    hub id or builtin name as given."""
    if src.run is not None:
        m = recipe.model
        return f"{m.name_or_path}@{m.revision}" if m.revision else m.name_or_path
    if src.folder is not None:
        return "sha256:" + model_fingerprint(src.folder)
    return src.name


def _fingerprint(src: Source) -> str | None:
    """The adapter the model was made from: a run's adapter, or the one a merged folder records."""
    if src.run is not None:
        return src.run.adapter_fingerprint()
    record = _heldout_record(src.path) if src.folder is not None else None
    return record.get("adapter_sha256") if record is not None else None


def _earlier_summary(out_dir: Path, overwrite: bool) -> dict | None:
    """The summary of the codetune eval folder at ``out_dir`` (None when there is none)."""
    path = out_dir / EVAL_SUMMARY
    if not out_dir.is_dir() or not path.is_file() or path.is_symlink():
        return None
    try:
        return read_eval_summary(path)  # runfiles' checked loader
    except InputError as exc:
        if overwrite:
            return None  # replaced whole
        why = str(exc).removeprefix(str(path)).removesuffix(f"; {EVAL_FIX}").lstrip(",: ")
        raise OutputError(
            f"{path} is not an evaluation summary codetune can add to ({why}): pass --overwrite to replace {out_dir}"
        ) from None


def _kept_suites(
    earlier: dict | None, made_from: dict, suites: list[str], out_dir: Path, overwrite: bool, console, words: dict
) -> list[str]:
    """The earlier suites to keep: those made from this same model and not run again now. Scoring a suite
    again needs ``overwrite``; the suites made from another model are dropped, and a line says so."""
    same, stale = _same_model(earlier, made_from)
    again = [s for s in suites if s in same]
    if again and not overwrite:
        raise OutputError(
            f"{words['what']} {out_dir} already has results for {', '.join(again)}: pass --overwrite to score "
            f"{'it' if len(again) == 1 else 'them'} again (the other suites are kept), or {words['elsewhere']}"
        )
    if stale and console is not None:
        console.print(
            f"{out_dir}: dropping the earlier results for {', '.join(stale)}: made from another adapter or model",
            highlight=False,
            markup=False,
        )
    return [s for s in same if s not in suites]


def _same_model(earlier: dict | None, made_from: dict) -> tuple[list[str], list[str]]:
    """The earlier suites made from this same model (kept), and the others (stale: dropped)."""
    if not earlier:
        return [], []
    names = [s for s in earlier.get("suites") or [] if isinstance(s, str)]
    kept, stale = [], []
    # a summary from before the base was recorded: the adapter's SHA-256 (when there is one) decides
    legacy = made_from["adapter_sha256"] is not None
    same_base = earlier.get("base") == made_from["base"] if "base" in earlier else legacy
    for suite in names:
        same = (
            same_base
            and earlier.get("model") == made_from["model"]
            and suite_info(earlier["results"], suite).get("adapter_sha256") == made_from["adapter_sha256"]
        )
        (kept if same else stale).append(suite)
    return kept, stale


def _accumulate(summary: dict, earlier: dict | None, kept: list[str], out_dir: Path, staging: Path) -> dict:
    """The new results plus the kept earlier suites: their summary entries and per-sample files, base/ included."""
    if not earlier or not kept:
        return summary
    for suite in kept:
        for sub in (Path("."), Path("base")):
            old = out_dir / sub / f"{suite}.jsonl"
            if is_regular_file(old):
                (staging / sub).mkdir(exist_ok=True)
                shutil.copyfile(old, staging / sub / f"{suite}.jsonl")
    results: dict[str, dict] = {m: {} for m in [*summary["results"], *earlier["results"]]}
    for model, entries in earlier["results"].items():
        if isinstance(entries, dict):
            results[model].update({s: v for s, v in entries.items() if s in kept})
    for model, entries in summary["results"].items():
        results[model].update(entries)
    order = [*kept, *summary["suites"]]
    summary["suites"] = [s for s in (earlier.get("suites") or []) if s in order]
    summary["suites"] += [s for s in order if s not in summary["suites"]]
    summary["results"] = {
        m: {s: r[s] for s in summary["suites"] if s in r} for m, r in results.items() if r
    }
    return summary


def _evaluate(
    src: Source, suites, recipe, staging: Path, compare_base, console, batch_size, merged: bool
) -> dict[str, Any]:
    loaded = load_for_inference(src, recipe=recipe, merged=merged)
    recipe = loaded.recipe
    tuned = InferenceSession.from_loaded(loaded)
    # the starter suites leave out what the model trained on: a run's training split, or a merged folder's record
    tasks = {s: load_tasks(s, recipe, src.folder) for s in suites}  # fail on a missing suite before generating
    trained = known_trained_ids(src.folder) if src.folder is not None else None
    if any(s in executed_suites() for s in suites):
        check_sandbox(recipe, console)  # strict refuses, auto warns, before any generating

    def run_all(label: str, dest: Path, session: InferenceSession) -> dict[str, dict]:
        results = {}
        for suite in suites:
            if console is not None:
                console.print(f"[{label}] {suite}: {len(tasks[suite])} tasks", highlight=False, markup=False)
            completions = generate_completions(session, tasks[suite], recipe, console, batch_size)
            results[suite] = score_suite(suite, tasks[suite], completions, recipe, dest, console)
            if from_starter(suite):
                results[suite]["held_out"] = trained is not None
        return results

    results = {"fine-tuned" if src.run else "model": run_all("model", staging, tuned)}
    if compare_base:
        if merged:  # the merged model has no adapter to switch off: the base, unquantized, in the same dtype
            import gc

            import torch

            del loaded.model, tuned  # both hold the merged model: free it before the base loads
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            base = load_base_model(recipe, quantize=False, device_map={"": 0} if torch.cuda.is_available() else None)
            disable_avx512_bf16_path(base)
            base_session = InferenceSession.from_loaded(loaded, model=base.eval())
            results["base"] = run_all("base", staging / "base", base_session)
        else:
            with loaded.model.disable_adapter():  # the same model object: the session stays valid
                results["base"] = run_all("base", staging / "base", tuned)
    return {
        "source": src.name,
        "recipe": recipe.name,
        "suites": list(suites),
        "results": results,
        "model": _evaluated(recipe, src, merged),
        "generation": recipe.generation.model_dump(),
    }


def _write_summary(folder: Path, summary: dict, title: str) -> None:
    (folder / EVAL_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "summary.md").write_text(summary_markdown(summary["results"], title), encoding="utf-8", errors="replace")


_earlier_eval = ours_or_legacy("eval", EVAL_SUMMARY)
# The evaluation settings that score completions made elsewhere (no model, no run): the improved default's.
SCORING_RECIPE = "phi3-mini-python"


def completions_out_dir(path: Path) -> Path:
    """``eval --completions FILE``'s default output: ``runs/eval-<stem>`` under the current directory,
    never a folder derived from the input's own location (which may be a shared, world-writable one)."""
    stem = Path(path).stem or Path(path).name or "completions"
    return Path("runs") / f"eval-{stem}"


def score_completions_file(
    path: Path,
    suite: str,
    *,
    recipe: Recipe | None = None,
    out_dir: Path | None = None,
    overwrite: bool = False,
    console=None,
) -> dict:
    """Score completions made anywhere else: one JSON line per completion with ``task_id`` and ``completion``.
    No model is involved: only the recipe's evaluation settings matter (default: ``SCORING_RECIPE``'s).

    Results go to ``out_dir`` (default ``runs/eval-<stem>``), built in a fresh staging folder: an
    existing folder is refused unless ``overwrite`` and it holds earlier codetune results."""
    path = Path(path)
    recipe = recipe or load_recipe(SCORING_RECIPE)
    words = _out_words(out_dir is not None)
    out_dir = Path(out_dir) if out_dir is not None else completions_out_dir(path)
    if suite not in executed_suites():
        raise RecipeError(f"--completions scores an executed suite: {', '.join(executed_suites())} (not {suite!r})")
    problem = file_problem(path)
    if problem is not None:
        raise InputError(f"--completions {path} {problem}: give a JSON-lines file")
    owner = run_of_eval(out_dir)
    if owner is not None:  # scores of completions made elsewhere are never a run's own results
        _refuse_run_eval(out_dir, owner)
    with staged_dir(out_dir, "eval", overwrite=overwrite, protect=[path], ours=_earlier_eval, **words) as staging:
        return _score_completions(path, suite, recipe, staging, console)


def _score_completions(path: Path, suite: str, recipe: Recipe, staging: Path, console) -> dict:
    tasks = {t.task_id: t for t in load_tasks(suite, recipe, None)}
    by_task: dict[str, list[str]] = {}
    for obj in read_jsonl(path):
        lineno = obj["__row__"]
        for key in ("task_id", "completion"):
            if not isinstance(obj.get(key), str):
                raise RecipeError(f"{path}, row {lineno}, field {key!r}: missing or not text")
        if obj["task_id"] not in tasks:
            raise RecipeError(f"{path}, row {lineno}, field 'task_id': {obj['task_id']!r} is not a {suite} task")
        by_task.setdefault(obj["task_id"], []).append(obj["completion"])
    if not by_task:
        raise RecipeError(f"{path}: no completions")
    chosen = [tasks[t] for t in by_task]
    n = min(len(v) for v in by_task.values())
    ks = [k for k in sorted({1, 10, 100}) if k <= n]
    result = score_suite(
        suite, chosen, [by_task[t.task_id] for t in chosen], recipe, staging, console, ks, suite_size=len(tasks)
    )
    result["missing_tasks"] = len(tasks) - len(by_task)
    if from_starter(suite):
        result["held_out"] = False  # completions made elsewhere, by a model whose training is not known here
    summary = {"source": str(path), "suites": [suite], "results": {"completions": {suite: result}}}
    _write_summary(staging, summary, f"Scores of {path.name}")
    return summary
