"""``mbpp``: MBPP's 500 test tasks (task ids 11-510) from ``evaluation.mbpp_source``.

Prompt: the task text, then "Your code should pass these tests:" and the three assert lines (the MBPP
paper's format). Program: the extracted code, the task's setup code, the asserts."""

from __future__ import annotations

import re
from pathlib import Path

from ._base import Suite, Task
from ._benchmarks import load_mbpp


def mbpp_prompt(text: str, tests: list[str]) -> str:
    return f"{text}\nYour code should pass these tests:\n\n" + "\n".join(tests)


def entry_point_of(tests: list[str]) -> str | None:
    """The function an MBPP task's first assert calls (``assert f(...)``, ``assert not (f(...))``)."""
    match = re.search(r"assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", tests[0]) if tests else None
    return match.group(1) if match else None


def mbpp_tasks(source: str) -> list[Task]:
    tasks = []
    for r in load_mbpp(source, test_only=True):
        tests = list(r["test_list"])
        tasks.append(
            Task(
                suite="mbpp",
                task_id=f"mbpp/{r['task_id']}",
                prompt=[{"role": "user", "content": mbpp_prompt(r["text"], tests)}],
                reference=r["code"].replace("\r\n", "\n"),
                entry_point=entry_point_of(tests),
                tests="\n".join(tests) + "\n",
                setup=(r.get("test_setup_code") or "").replace("\r\n", "\n"),
            )
        )
    return tasks


def load(recipe, folder: Path | None) -> list[Task]:
    return mbpp_tasks(recipe.evaluation.mbpp_source)


def decontamination(recipe) -> list[str]:
    # every MBPP task, not only the test ones: a leaked training or validation task is still MBPP
    return [r["text"] for r in load_mbpp(recipe.evaluation.mbpp_source, test_only=False)]


SUITE = Suite(
    name="mbpp",
    description="MBPP's 500 test tasks (ids 11-510), pass@k of the code run against the task's asserts",
    load=load,
    prompt=mbpp_prompt,
    decontamination=decontamination,
    card_dataset=("mbpp", "MBPP (test, tasks 11-510)", "test"),
    order=20,
)
