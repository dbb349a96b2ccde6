"""``starter-family``: the held-out starter tasks that are new members of a task family the run's training
split taught (other names, constants, constant types). Without a run directory nothing was trained: every
family task is in it."""

from __future__ import annotations

from pathlib import Path

from ._base import Suite, Task
from .starter import prompt, starter_tasks, trained_and_formatting


def starter_split_tasks(suite: str, trained: set[str], formatting: str = "clean") -> list[Task]:
    """``starter-family`` or ``starter-novel``: the held-out starter tasks whose family was / was not taught."""
    from ..starter import load_starter

    family = {r["task_id"]: r.get("family") for r in load_starter()}
    taught = {family[t] for t in trained if family.get(t)} if trained else {f for f in family.values() if f}
    tasks = []
    for task in starter_tasks(trained, formatting):
        if (family[task.task_id] in taught) == (suite == "starter-family"):
            task.suite = suite
            tasks.append(task)
    return tasks


def load(recipe, folder: Path | None) -> list[Task]:
    return starter_split_tasks("starter-family", *trained_and_formatting(recipe, folder))


SUITE = Suite(
    name="starter-family",
    description="held-out starter tasks of task families the training taught (new members), pass@k",
    load=load,
    prompt=prompt,
    held_out=True,
    # one split each: the hub would otherwise fold the two rows of the same dataset into one
    card_dataset=(
        "codetune-starter",
        "codetune starter set (held-out members of taught task families)",
        "held-out-family",
    ),
    order=31,
)
