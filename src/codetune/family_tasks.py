"""The task families of the starter set, and fresh members of them.

A family is one kind of task asked many times over with other names, parameter names, constants and
constant types: "multiply every number in `prices` by 3", "... in `xs` by 0.5". ``starter_rows`` makes the
family rows of src/codetune/assets/starter.jsonl (scripts/starter_families.py writes them; a fixed seed, so
the file is reproducible). ``fresh_members`` makes more members of the same families that are none of
those rows: no (family, function name) and no (family, solution body) of the starter set, nor of the
members it is told to avoid. The ``starter-fresh`` suite is one such set (a fixed seed, 20 per family),
and ``rl.tasks: fresh`` another, disjoint from it: what RL learns from is then never what it is scored on.

Every member's reference is run on its own tests when it is made, and a member whose tests a constant
answer would pass is redrawn.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

MEMBERS = 40  # per family; about a tenth of them land in the held-out split
SEED = 15

NOUNS = ["prices", "scores", "values", "weights", "counts", "sizes", "marks", "totals", "levels", "ages",
         "speeds", "points", "amounts", "readings", "heights", "ranks", "costs", "votes", "loads", "steps"]
PARAMS_LIST = ["values", "nums", "items", "data", "xs", "numbers", "seq", "vals", "arr", "lst", "row", "col"]
PARAMS_NUM = ["n", "x", "value", "num", "k", "m", "a", "number", "v", "q", "z", "t"]
PARAMS_STR = ["s", "text", "word", "name", "line", "label", "token", "msg", "title", "code"]
WORDS = ["ab", "pre", "tmp", "log", "x", "data", "id", "re", "un", "sub", "py", "dev", "test", "max"]
KEYS = ["name", "id", "size", "color", "mode", "level", "user", "port", "host", "kind", "rate", "unit"]
VERBS = ["Write", "Create", "Implement", "Define"]
# A function's name is a verb of this pool and a noun, whatever its family: a family's own verbs
# ("scale", "boost") would let a model guess the name from the task's wording instead of reading it.
NAME_VERBS = ["calc", "make", "do", "apply", "run", "build", "process", "handle", "solve", "compute",
              "transform", "get", "fn", "eval", "go", "task", "my", "new", "next", "main", "core", "basic",
              "simple", "quick"]


def _ints(r: random.Random, lo: int, hi: int) -> int:
    return r.randint(lo, hi)


def _num(r: random.Random) -> int | float:
    # the type is part of what varies: most constants are ints, some floats
    return r.randint(2, 9) if r.random() < 0.7 else r.choice([0.5, 1.5, 2.5, 0.25, 3.5])


def _lists(r: random.Random) -> list[list[int]]:
    return [[r.randint(-5, 12) for _ in range(r.randint(3, 5))] for _ in range(2)] + [[]]


# Each family: (parameter pool, constant maker, instruction, solution, test inputs).
# An instruction has at most 12 words after the function's name (unique to its member), so two
# members never share 13 consecutive words: `codetune prepare` drops a training row that shares a
# 13-word n-gram with a test prompt, and would otherwise drop the taught members as leaks.
MAX_WORDS_AFTER_NAME = 12


def fam_scale(r):
    k = _num(r)
    return dict(
        params=PARAMS_LIST,
        text="returns a list with every number of {p} times {k!r}.",
        body="return [x * {k!r} for x in {p}]",
        k=k,
        inputs=lambda: [(v,) for v in _lists(r)],
    )


def fam_shift(r):
    k = _num(r)
    return dict(
        params=PARAMS_LIST,
        text="returns a list of each number of {p} plus {k!r}.",
        body="return [x + {k!r} for x in {p}]",
        k=k,
        inputs=lambda: [(v,) for v in _lists(r)],
    )


def fam_above(r):
    k = r.randint(0, 8) if r.random() < 0.7 else r.choice([2.5, 4.5, 0.5])
    return dict(
        params=PARAMS_LIST,
        text="returns the numbers of {p} greater than {k!r}, in order.",
        body="return [x for x in {p} if x > {k!r}]",
        k=k,
        inputs=lambda: [(v,) for v in _lists(r)] + [([k, k + 1, k - 1],)],
    )


def fam_divisible(r):
    k = r.randint(2, 13)
    return dict(
        params=PARAMS_NUM,
        text="returns True if the integer {p} is divisible by {k!r}.",
        body="return {p} % {k!r} == 0",
        k=k,
        inputs=lambda: [(k * r.randint(1, 9),), (k * r.randint(1, 9) + 1,), (0,), (k * r.randint(10, 20) + 1,)],
    )


def fam_power(r):
    k = r.randint(2, 6)
    return dict(
        params=PARAMS_NUM,
        text="returns the number {p} raised to the power {k!r}.",
        body="return {p} ** {k!r}",
        k=k,
        inputs=lambda: [(r.randint(2, 9),), (r.randint(-4, -1),), (1,)],
    )


def fam_repeat(r):
    k = r.randint(2, 8)
    return dict(
        params=PARAMS_STR,
        text="returns the string {p} repeated {k!r} times.",
        body="return {p} * {k!r}",
        k=k,
        inputs=lambda: [(r.choice(WORDS),), (r.choice(WORDS) + "!",), ("",)],
    )


def fam_prefix(r):
    k = r.choice(WORDS)
    return dict(
        params=PARAMS_STR,
        text="returns True if the string {p} starts with {k!r}.",
        body="return {p}.startswith({k!r})",
        k=k,
        inputs=lambda: [(k + r.choice(WORDS),), (r.choice("qwz") + k,), (k,), ("",)],
    )


def fam_count(r):
    k = r.randint(0, 9) if r.random() < 0.6 else r.choice(["a", "b", "x", "ok", "no"])
    if isinstance(k, int):
        gen = lambda: [r.choice([k, k, 1, 2, 3, 4]) for _ in range(r.randint(3, 6))]  # noqa: E731
    else:
        gen = lambda: [r.choice([k, k, "c", "d", "yes"]) for _ in range(r.randint(3, 6))]  # noqa: E731
    return dict(
        params=PARAMS_LIST,
        text="returns how many times {k!r} occurs in the list {p}.",
        body="return {p}.count({k!r})",
        k=k,
        inputs=lambda: [(gen(),), (gen(),), ([],)],
    )


def fam_lookup(r):
    k = r.choice(KEYS)
    d = r.choice([0, -1, None, "", "unknown", 1])

    def dicts():
        return [({k: r.randint(1, 99), "other": 5},), ({"zzz": 1},), ({k: "v" + str(r.randint(1, 9))},)]

    return dict(
        params=["d", "config", "record", "row", "options", "entry", "mapping", "info", "obj", "settings"],
        text="returns {p}[{k!r}], or " + repr(d) + " when the key is missing.",
        body="return {p}.get({k!r}, " + repr(d) + ")",
        k=k,
        inputs=dicts,
        # a stub returns None: with a None default the missing-key test alone would not catch it
        ok=lambda: d is not None,
    )


def fam_cap(r):
    k = r.randint(5, 100) if r.random() < 0.7 else r.choice([1.5, 9.5, 0.5])
    return dict(
        params=PARAMS_NUM,
        text="returns the smaller of {p} and {k!r}.",
        body="return min({p}, {k!r})",
        k=k,
        inputs=lambda: [(k + r.randint(1, 9),), (k - r.randint(1, 3),), (k,)],
    )


def fam_long_words(r):
    k = r.randint(2, 8)

    def sentences():
        words = ["a", "to", "cat", "tree", "house", "garden", "planet", "yes", "bottle", "no"]
        return [(" ".join(r.choice(words) for _ in range(r.randint(4, 7))),) for _ in range(3)] + [("",)]

    return dict(
        params=PARAMS_STR,
        text="returns the words of the string {p} longer than {k!r} characters.",
        body="return [w for w in {p}.split() if len(w) > {k!r}]",
        k=k,
        inputs=sentences,
    )


FAMILIES = {
    "scale": fam_scale,
    "shift": fam_shift,
    "above": fam_above,
    "divisible": fam_divisible,
    "power": fam_power,
    "repeat": fam_repeat,
    "prefix": fam_prefix,
    "count": fam_count,
    "lookup": fam_lookup,
    "cap": fam_cap,
    "long-words": fam_long_words,
}



def _solution(name: str, param: str, body: str) -> str:
    return f"def {name}({param}):\n    {body}\n"


def _draw(r: random.Random, make, taken: set[str], seen: set) -> tuple[dict, str, tuple] | None:
    """One candidate member of a family (``make``), or None when it is rejected: its name is in ``taken``, its
    (parameter, constant) in ``seen``, or a constant answer would pass its tests. Draws from ``r`` in the order
    the starter set was generated with."""
    spec = make(r)
    if not spec.get("ok", lambda: True)():
        return None
    name = f"{r.choice(NAME_VERBS)}_{r.choice(NOUNS)}"
    param = r.choice(spec["params"])
    key = (param, repr(spec["k"]))
    if name in taken or key in seen:
        return None
    body = spec["body"].format(p=param, k=spec["k"])
    code = _solution(name, param, body)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - our own generated reference
    tests, outs = [], set()
    for args in spec["inputs"]():
        expected = scope[name](*args)
        tests.append(f"assert {name}({', '.join(map(repr, args))}) == {expected!r}")
        outs.add(repr(expected))
    if len(outs) < 2 or "None" in outs:  # a constant answer must not pass the tests
        return None
    text = spec["text"].format(p=param, k=spec["k"])
    assert len(re.findall(r"\w+", text.lower())) + 1 <= MAX_WORDS_AFTER_NAME, text
    row = {
        "instruction": f"{r.choice(VERBS)} a Python function {name}({param}) that {text}",
        "input": "",
        "output": code,
        "entry_point": name,
        "test_list": tests,
    }
    return row, body, key


def starter_rows(first_id: int, members: int = MEMBERS, seed: int = SEED) -> list[dict]:
    """The starter set's family rows, ids from ``starter/<first_id>``: ``members`` per family, every name unique."""
    r = random.Random(seed)
    rows: list[dict] = []
    used_names: set[str] = set()
    for family, make in FAMILIES.items():
        seen: set[tuple] = set()
        count = 0
        while count < members:
            drawn = _draw(r, make, used_names, seen)
            if drawn is None:
                continue
            row, _, key = drawn
            seen.add(key)
            used_names.add(row["entry_point"])
            rows.append({"task_id": f"starter/{first_id + len(rows)}", "family": family, **row})
            count += 1
    return rows


def fresh_members(
    seed: int, per_family: int, *, avoid: Iterable[dict] = (), families: Iterable[str] | None = None, prefix: str = "fresh"
) -> list[dict]:
    """``per_family`` new members of each family (default: all), as starter rows with ids ``<prefix>/<n>``: none
    shares a (family, function name) with the starter set or with ``avoid``. Its parameter and constant may be
    a starter row's (a family such as long-words has 40 that pass its tests, all in the starter set); its name
    may be another family's (480 names, 440 taken by the starter set's families): the model must read which
    task it is and what it is called, not recall either."""
    from .starter import load_starter

    taken: dict[str, set[str]] = {}
    for row in [*load_starter(), *avoid]:
        if row.get("family"):
            taken.setdefault(row["family"], set()).add(row["entry_point"])
    r = random.Random(seed)
    rows: list[dict] = []
    for family in families or FAMILIES:
        if family not in FAMILIES:
            raise ValueError(f"unknown task family {family!r}; the families: {', '.join(FAMILIES)}")
        names = taken.setdefault(family, set())
        if len(names) + per_family > len(NAME_VERBS) * len(NOUNS):
            raise ValueError(f"family {family}: {per_family} fresh members asked, {len(NAME_VERBS) * len(NOUNS) - len(names)} names left")
        for _ in range(per_family):
            drawn = None
            while drawn is None:
                drawn = _draw(r, FAMILIES[family], names, set())
            names.add(drawn[0]["entry_point"])
            rows.append({"task_id": f"{prefix}/{len(rows)}", "family": family, **drawn[0]})
    return rows


# The two fresh sets codetune uses, disjoint: the starter-fresh suite's and rl.tasks: fresh's
EVAL_SEED, RL_SEED = 1, 2
EVAL_PER_FAMILY = 20


def fresh_eval_rows() -> list[dict]:
    """The ``starter-fresh`` suite's tasks: ``EVAL_PER_FAMILY`` fresh members of every family."""
    return fresh_members(EVAL_SEED, EVAL_PER_FAMILY, prefix="starter-fresh")


def fresh_rl_rows(per_family: int, families: Iterable[str] | None = None) -> list[dict]:
    """Tasks for RL (``rl.tasks: fresh``): fresh members of ``families`` that are none of the starter set's and
    none of ``starter-fresh``'s, so a gain measured there is never on what RL learned from."""
    return fresh_members(RL_SEED, per_family, avoid=fresh_eval_rows(), families=families, prefix="fresh")
