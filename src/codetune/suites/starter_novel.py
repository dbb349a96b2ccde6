"""``starter-novel``: the held-out starter tasks unlike anything trained on (hand-written tasks, and family
tasks whose family the training split did not teach). Without a run directory: the hand-written tasks."""

from __future__ import annotations

from pathlib import Path

from ._base import Suite, Task
from .starter import prompt, trained_and_formatting
from .starter_family import starter_split_tasks


def load(recipe, folder: Path | None) -> list[Task]:
    return starter_split_tasks("starter-novel", *trained_and_formatting(recipe, folder))


SUITE = Suite(
    name="starter-novel",
    description="held-out starter tasks unlike any trained on, pass@k",
    load=load,
    prompt=prompt,
    held_out=True,
    card_dataset=("codetune-starter", "codetune starter set (held-out tasks unlike any trained on)", "held-out-novel"),
    order=32,
)
