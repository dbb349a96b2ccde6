"""``starter-fresh``: 20 new members of each task family the run's training split taught, made by
``codetune.family_tasks`` with a fixed seed. No function name of theirs is a starter row's in that family, so
no run trained on one, and none is a task ``rl.tasks: fresh`` learns from. With every family taught it holds
220 tasks, five times starter-family's held-out members: a gain measured on it has a standard error near
3 points of pass@1 where starter-family's is near 7."""

from __future__ import annotations

from pathlib import Path

from ._base import Suite, Task
from .starter import prompt, row_task, trained_and_formatting

NAME = "starter-fresh"


def fresh_tasks(trained: set[str], formatting: str = "clean") -> list[Task]:
    """The fresh members of the families ``trained`` taught (every family when nothing was trained)."""
    from ..family_tasks import fresh_eval_rows
    from ..starter import load_starter

    family = {r["task_id"]: r.get("family") for r in load_starter()}
    taught = {family[t] for t in trained if family.get(t)} if trained else None
    return [row_task(r, NAME, formatting) for r in fresh_eval_rows() if taught is None or r["family"] in taught]


def load(recipe, folder: Path | None) -> list[Task]:
    return fresh_tasks(*trained_and_formatting(recipe, folder))


SUITE = Suite(
    name=NAME,
    description="fresh members of the task families the training taught (20 each, no starter row's name), pass@k",
    load=load,
    prompt=prompt,
    held_out=True,
    card_dataset=("codetune-starter", "codetune starter families (fresh members)", "fresh-family"),
    order=33,
)
