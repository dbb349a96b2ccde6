"""``rouge``: the first ``evaluation.samples`` rows of the run's test split, the user turn exactly as
prepared, scored with ROUGE-1/2/L/Lsum against the reference answer (the reference card's metric)."""

from __future__ import annotations

from pathlib import Path

from ..errors import RecipeError
from ._base import Suite, Task


def prompt(row: dict) -> list[dict[str, str]]:
    """The prepared row's own prompt turns (rendered for training by the same template)."""
    return row["prompt"]


def rouge_tasks(run_dir: Path, samples: int) -> list[Task]:
    from ..data import load_split

    test = load_split(run_dir, "test")
    n = min(samples, len(test))
    return [
        Task(suite="rouge", task_id=f"test/{i}", prompt=prompt(row), reference=row["reference"])
        for i, row in enumerate(test.select(range(n)))
    ]


def load(recipe, folder: Path | None) -> list[Task]:
    if folder is None or not (folder / "data" / "test.parquet").is_file():
        raise RecipeError("the rouge suite scores a run's test split: give a run directory that has data/")
    return rouge_tasks(folder, recipe.evaluation.samples)


SUITE = Suite(
    name="rouge",
    description="ROUGE-1/2/L/Lsum of the answers to the run's test split (the first evaluation.samples rows)",
    load=load,
    prompt=prompt,
    scoring="rouge",
    order=0,
)
