"""The starter set: small Python tasks that codetune ships, each with a reference solution and tests.

It is the demo's training data and an offline execution benchmark. Rows use the alpaca schema
(``instruction``, ``input``, ``output``) plus ``task_id``, ``entry_point`` and ``test_list``
(assert lines that the reference solution passes).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def _rows() -> tuple[dict, ...]:
    text = (resources.files("codetune.assets") / "starter.jsonl").read_text(encoding="utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


def load_starter() -> list[dict]:
    return [dict(row) for row in _rows()]
