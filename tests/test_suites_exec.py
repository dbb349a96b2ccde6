"""The executed suites' own reference solutions, run through the sandbox: the graders are right."""

import json

from codetune.sandbox import Limits, run_programs
from codetune.suites import extract_code, scored_program
from codetune.suites.humaneval import humaneval_tasks
from codetune.suites.mbpp import mbpp_tasks
from codetune.suites.starter import starter_tasks

from .conftest import MBPP_JSONL, needs_mbpp

LIMITS = Limits(timeout_s=20.0, cpu_s=20)

# MBPP reference solutions that fail their own tests, and why (checked by hand; see the test below).
MBPP_KNOWN_BAD: dict[str, str] = {}


def _broken(body: str) -> str:
    """The canonical body with its first statement replaced by a wrong early return."""
    return "    return None\n" + body


def test_every_canonical_humaneval_solution_passes_and_a_broken_copy_fails():
    tasks = humaneval_tasks()
    good = run_programs([scored_program(t, t.reference) for t in tasks], LIMITS)
    failing = [(t.task_id, v.status, v.error) for t, v in zip(tasks, good, strict=True) if not v.passed]
    assert failing == [] and len(good) == 164
    bad = run_programs([scored_program(t, _broken(t.reference)) for t in tasks], LIMITS)
    passing = [t.task_id for t, v in zip(tasks, bad, strict=True) if v.passed]
    assert passing == []


def test_starter_reference_solutions_pass_through_the_eval_path():
    tasks = starter_tasks()
    answers = [f"Here is the function:\n```python\n{t.reference}\n```\nIt works." for t in tasks]
    programs = [scored_program(t, extract_code(a, t.entry_point)) for t, a in zip(tasks, answers, strict=True)]
    verdicts = run_programs(programs, LIMITS)
    assert [t.task_id for t, v in zip(tasks, verdicts, strict=True) if not v.passed] == []


def test_starter_stubs_fail_through_the_eval_path():
    tasks = starter_tasks()
    stubs = [f"def {t.entry_point}(*args, **kwargs):\n    return None\n" for t in tasks]
    verdicts = run_programs([scored_program(t, stub) for t, stub in zip(tasks, stubs, strict=True)], LIMITS)
    assert [t.task_id for t, v in zip(tasks, verdicts, strict=True) if v.passed] == []


@needs_mbpp
def test_mbpp_reference_solutions_pass_or_are_listed_with_a_reason():
    tasks = mbpp_tasks(str(MBPP_JSONL))
    verdicts = run_programs([scored_program(t, t.reference) for t in tasks], LIMITS)
    failing = {t.task_id: v.error for t, v in zip(tasks, verdicts, strict=True) if not v.passed}
    assert set(failing) == set(MBPP_KNOWN_BAD), json.dumps(failing, indent=1)
