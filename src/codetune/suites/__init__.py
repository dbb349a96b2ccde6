"""The evaluation suites: one module each in this package, registered when the package is imported.

A suite module defines ``SUITE = Suite(name=..., description=..., load=..., prompt=..., scoring=...)``
(see ``Suite``); the recipe's allowed ``evaluation.suites`` and ``data.decontaminate`` values, the
evaluation and the model card all read this registry, so adding a suite is adding a module. Modules
whose name starts with ``_`` hold shared code and are not suites.
"""

from __future__ import annotations

import importlib
import pkgutil

from ._base import (
    REGISTRY,
    SCORINGS,
    Suite,
    Task,
    all_suites,
    decontamination_sources,
    executed_suites,
    get_suite,
    register,
    suite_names,
)
from ._benchmarks import MBPP_TEST_IDS, load_humaneval, load_mbpp
from ._scoring import (
    ROUGE_TYPES,
    SCORERS,
    Reporter,
    build_program,
    check_sandbox,
    extract_code,
    parses,
    pass_at_k,
    program_parses,
    rouge_means,
    rouge_per_sample,
    score_suite,
    scored_program,
)

__all__ = [
    "REGISTRY", "SCORINGS", "Suite", "Task", "all_suites", "decontamination_sources", "discover", "executed_suites",
    "get_suite", "register", "suite_names", "MBPP_TEST_IDS", "load_humaneval", "load_mbpp",
    # scoring (suites/_scoring.py): one path for every stage that needs a verdict
    "ROUGE_TYPES", "SCORERS", "Reporter", "build_program", "check_sandbox", "extract_code", "parses", "pass_at_k",
    "program_parses", "rouge_means", "rouge_per_sample", "score_suite", "scored_program",
]  # fmt: skip


def discover() -> None:
    """Import every suite module on this package's path and register its ``SUITE``."""
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        suite = getattr(module, "SUITE", None)
        if not isinstance(suite, Suite):
            raise TypeError(f"{module.__name__} defines no SUITE = Suite(...)")
        register(suite)


discover()
