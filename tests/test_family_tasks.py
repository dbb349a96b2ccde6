"""Fresh members of the starter families (codetune.family_tasks): the starter-fresh suite's 220 held-out tasks and
the tasks `rl.tasks: fresh` learns from, each a task no run trained on and neither a task of the other."""

import pytest

from codetune.family_tasks import FAMILIES, fresh_eval_rows, fresh_members, fresh_rl_rows, starter_rows
from codetune.starter import load_starter


def _keys(rows):
    return {(r["family"], r["entry_point"]) for r in rows}


def test_the_starter_sets_family_rows_are_what_the_generator_makes():
    starter = load_starter()
    hand = [r for r in starter if not r.get("family")]
    assert starter_rows(len(hand)) == [r for r in starter if r.get("family")]  # scripts/starter_families.py's output


def test_fresh_sets_are_disjoint_from_the_starter_set_and_each_other():
    evals, rl = fresh_eval_rows(), fresh_rl_rows(30)
    starter = [r for r in load_starter() if r.get("family")]
    assert len(evals) == 20 * len(FAMILIES) == 220 and len(rl) == 30 * len(FAMILIES)
    assert not _keys(evals) & _keys(starter) and not _keys(rl) & _keys(starter) and not _keys(evals) & _keys(rl)
    instructions = {r["instruction"] for r in starter}
    assert not {r["instruction"] for r in evals + rl} & instructions
    assert len({r["task_id"] for r in evals}) == 220 and all(r["task_id"].startswith("starter-fresh/") for r in evals)
    # made again, the same: a suite and a benchmark score the same tasks every time
    assert fresh_eval_rows() == evals and fresh_rl_rows(30) == rl
    assert [r["family"] for r in fresh_rl_rows(2, families=["scale", "cap"])] == ["scale", "scale", "cap", "cap"]


def _passes(code: str, tests: list[str]) -> bool:
    scope: dict = {}
    try:
        exec(code + "\n" + "\n".join(tests), scope)  # noqa: S102 - codetune's own generated tasks
    except AssertionError:
        return False
    return True


def test_every_fresh_reference_passes_its_tests_and_a_constant_answer_fails_them():
    # in this process: these are codetune's own generated references (test_starter.py runs the starter set's apart)
    for r in fresh_eval_rows() + fresh_rl_rows(5):
        assert _passes(r["output"], r["test_list"]), r["task_id"]
        assert not _passes(f"def {r['entry_point']}(*args, **kwargs):\n    return None\n", r["test_list"]), r["task_id"]


def test_asking_for_more_than_there_is_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unknown task family 'scales'"):
        fresh_members(1, 1, families=["scales"])
    with pytest.raises(ValueError, match="family scale: 1000 fresh members asked, 440 names left"):
        fresh_members(1, 1000, families=["scale"])


def test_the_starter_fresh_suite_holds_the_taught_families_members():
    from codetune.suites.starter_fresh import fresh_tasks

    scale = next(r["task_id"] for r in load_starter() if r.get("family") == "scale")
    taught = fresh_tasks({scale})
    assert len(taught) == 20 and {t.suite for t in taught} == {"starter-fresh"}
    assert all("times" in t.prompt[0]["content"] for t in taught)  # scale's wording
    assert len(fresh_tasks(set())) == 220  # nothing trained: every family
