"""Regenerate the family rows of the starter set (src/codetune/assets/starter.jsonl).

The families and their generator live in ``codetune.family_tasks`` (the ``starter-fresh`` suite and
``rl.tasks: fresh`` draw more members from them). The random train/test split of `codetune prepare` puts
some members of each family in the test split: they are held out, but their family was taught, so a
fine-tune that learned the family solves them while its base does not (the `starter-family` evaluation
suite). The 184 hand-written tasks have no family; held out, they are the `starter-novel` suite.

Deterministic (a fixed seed): running it twice writes the same file. Every reference is run on its
tests here; tests/test_starter.py runs them again, and checks that a stub fails each test list.

    python scripts/starter_families.py
"""

from __future__ import annotations

import json
from pathlib import Path

from codetune.family_tasks import starter_rows

STARTER = Path(__file__).resolve().parents[1] / "src" / "codetune" / "assets" / "starter.jsonl"


def main() -> None:
    lines = STARTER.read_text(encoding="utf-8").splitlines()
    hand = [json.loads(line) for line in lines if line.strip() and "family" not in json.loads(line)]
    rows = hand + starter_rows(len(hand))
    STARTER.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"{len(hand)} hand-written tasks + {len(rows) - len(hand)} family tasks -> {STARTER}")


if __name__ == "__main__":
    main()
