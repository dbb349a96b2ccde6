"""``starter``: codetune's starter set, minus any task the model trained on.

Prompt: the instruction (and input) as the recipe formats training rows. Program: the extracted code and
its asserts. Which tasks were trained on comes from the run's training split, or the record a merged
folder carries; without either (``--completions``, a model from elsewhere) every task is scored and the
scores say they are not known to be held out."""

from __future__ import annotations

from pathlib import Path

from ._base import Suite, Task


def prompt(row: dict, formatting: str = "clean") -> str:
    from ..data import user_content

    return user_content(row["instruction"], row["input"], formatting)


def row_task(row: dict, suite: str, formatting: str = "clean") -> Task:
    """A starter-schema row (the starter set's, or a fresh family member) as a task of ``suite``."""
    return Task(
        suite=suite,
        task_id=row["task_id"],
        prompt=[{"role": "user", "content": prompt(row, formatting)}],
        reference=row["output"],
        entry_point=row["entry_point"],
        tests="\n".join(row["test_list"]) + "\n",
    )


def starter_tasks(exclude: set[str] | None = None, formatting: str = "clean") -> list[Task]:
    from ..starter import load_starter

    return [row_task(r, "starter", formatting) for r in load_starter() if r["task_id"] not in (exclude or set())]


def trained_and_formatting(recipe, folder: Path | None) -> tuple[set[str], str]:
    """The task ids to leave out, and how the recipe formats an instruction and its input."""
    from ..data import trained_task_ids

    exclude = trained_task_ids(folder) if folder else set()
    return exclude, recipe.data.formatting if recipe.data.format == "alpaca" else "clean"


def load(recipe, folder: Path | None) -> list[Task]:
    return starter_tasks(*trained_and_formatting(recipe, folder))


SUITE = Suite(
    name="starter",
    description="codetune's starter set minus the tasks trained on, pass@k of the code run against its asserts",
    load=load,
    prompt=prompt,
    held_out=True,
    card_dataset=("codetune-starter", "codetune starter set (held-out tasks)", "held-out"),
    order=30,
)
