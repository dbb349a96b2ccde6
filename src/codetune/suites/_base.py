"""What a suite module declares, and the registry the suite modules of this package fill on import."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError

if TYPE_CHECKING:
    from ..recipe import Recipe

# How a suite is scored (suites._scoring.SCORERS holds one scorer for each).
SCORINGS = ("executed", "rouge")


@dataclass
class Task:
    suite: str
    task_id: str
    prompt: list[dict[str, str]]
    reference: str = ""
    entry_point: str | None = None
    tests: str = ""  # test code appended after the candidate
    preamble: str = ""  # code the candidate completes (HumanEval's prompt)
    setup: str = ""  # benchmark code run after the candidate's, before the tests (MBPP's test_setup_code)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    """One evaluation suite, declared as ``SUITE = Suite(...)`` by its own module in ``codetune.suites``.

    ``load(recipe, folder)`` returns its tasks; ``folder`` is the run directory or model folder being
    evaluated (None when scoring completions made elsewhere). ``prompt`` builds the user turn of one of
    its items (``load`` uses it; it is declared so that the prompt format is part of the suite's
    definition). ``scoring``: "executed" runs each task's tests on the extracted code in the sandbox
    (pass@k); "rouge" compares the answer with the reference. ``decontamination(recipe)``: the texts a
    training row must not overlap (``data.decontaminate`` may then name the suite), or None.
    ``held_out``: the suite leaves out the tasks the model trained on, so its scores say whether that was
    known. ``card_dataset``: (dataset type, name, split) under which the model card publishes its pass@k.
    ``order``: where it stands in lists and tables."""

    name: str
    description: str
    load: Callable[[Recipe, Path | None], list[Task]]
    prompt: Callable[..., Any]
    scoring: str = "executed"
    decontamination: Callable[[Recipe], list[str]] | None = None
    held_out: bool = False
    card_dataset: tuple[str, str, str] | None = None
    order: int = 100

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"suite {self.name!r}: scoring must be one of {', '.join(SCORINGS)}, not {self.scoring!r}")


REGISTRY: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    if suite.name in REGISTRY and REGISTRY[suite.name] is not suite:
        raise ValueError(f"two suites are named {suite.name!r}")
    REGISTRY[suite.name] = suite
    return suite


def all_suites() -> list[Suite]:
    return sorted(REGISTRY.values(), key=lambda s: (s.order, s.name))


def suite_names() -> list[str]:
    return [s.name for s in all_suites()]


def executed_suites() -> list[str]:
    return [s.name for s in all_suites() if s.scoring == "executed"]


def decontamination_sources() -> list[str]:
    """The suites whose texts ``data.decontaminate`` can keep out of training (besides the test split)."""
    return [s.name for s in all_suites() if s.decontamination is not None]


def get_suite(name: str) -> Suite:
    try:
        return REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown suite {name!r}: choose from {', '.join(suite_names())}") from None
