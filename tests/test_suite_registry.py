"""The evaluation-suite registry: a suite is one module in codetune.suites, and adding one touches nothing else.

The test writes a suite module of its own, lets the registry discover it (as it discovers the shipped
ones) and uses it everywhere a shipped suite goes: the recipe, ``codetune eval`` on the tiny model, scoring
completions made elsewhere, and ``data.decontaminate``."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

import codetune.suites as suites
from codetune.recipe import RecipeError, load_recipe

FAST = ["generation.max_new_tokens=8", "evaluation.sandbox=auto"]

# The whole of a new suite: its tasks, their prompt, its scoring, the texts to decontaminate against.
SUITE_MODULE = '''
"""``doubled``: write a function that multiplies a number (a suite defined outside codetune)."""

from codetune.suites import Suite, Task

ITEMS = [("double_it", 2), ("triple_it", 3), ("quadruple_it", 4)]


def prompt(name, factor):
    return f"Write a Python function {name}(x) that returns x times {factor}."


def load(recipe, folder):
    return [
        Task(
            suite="doubled",
            task_id=f"doubled/{name}",
            prompt=[{"role": "user", "content": prompt(name, factor)}],
            reference=f"def {name}(x):\\n    return x * {factor}\\n",
            entry_point=name,
            tests=f"assert {name}(2) == {2 * factor}\\nassert {name}(-1) == {-factor}\\n",
        )
        for name, factor in ITEMS
    ]


def decontamination(recipe):
    from codetune.starter import load_starter

    return [r["instruction"] for r in load_starter() if r.get("family") == "scale"]


SUITE = Suite(name="doubled", description="multiply a number", load=load, prompt=prompt,
              decontamination=decontamination)
'''


@pytest.fixture
def doubled(tmp_path, monkeypatch):
    """The suite module dropped into a folder on the package's path, then the registry discovers it."""
    folder = tmp_path / "more_suites"
    folder.mkdir()
    (folder / "doubled.py").write_text(textwrap.dedent(SUITE_MODULE))
    monkeypatch.setattr(suites, "__path__", [*suites.__path__, str(folder)])
    suites.discover()
    yield suites.REGISTRY["doubled"]
    suites.REGISTRY.pop("doubled", None)
    sys.modules.pop("codetune.suites.doubled", None)


def test_shipped_suites_come_from_the_registry_in_their_order():
    assert suites.suite_names() == ["rouge", "humaneval", "mbpp", "starter", "starter-family", "starter-novel", "starter-fresh"]
    assert suites.executed_suites() == ["humaneval", "mbpp", "starter", "starter-family", "starter-novel", "starter-fresh"]
    assert suites.decontamination_sources() == ["humaneval", "mbpp"]


def test_a_suite_the_registry_does_not_know_is_refused_in_one_line_naming_the_field_and_the_allowed():
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny-cpu", ["evaluation.suites=[rouge, doubled]"])
    msg = str(err.value)
    assert "\n" not in msg and "evaluation.suites" in msg and "'doubled'" in msg
    assert "allowed: rouge, humaneval, mbpp, starter, starter-family, starter-novel, starter-fresh" in msg
    with pytest.raises(RecipeError, match=r"data\.decontaminate: unknown decontamination source\(s\) 'starter'; "
                       r"allowed: test, humaneval, mbpp"):  # fmt: skip
        load_recipe("tiny-cpu", ["data.decontaminate=[test, starter]"])


def test_a_new_suite_module_is_accepted_by_the_recipe_and_evaluated_end_to_end(doubled, tiny_dir, tmp_path):
    from codetune.evaluate import evaluate, score_completions_file

    assert suites.suite_names()[-1] == "doubled" and "doubled" in suites.executed_suites()
    recipe = load_recipe("tiny-cpu", [*FAST, "evaluation.suites=[doubled]", "data.decontaminate=[test, doubled]"])
    summary = evaluate(tiny_dir, recipe.evaluation.suites, recipe=recipe, out_dir=tmp_path / "eval")
    result = summary["results"]["model"]["doubled"]
    assert (result["tasks"], result["tasks_in_suite"], result["n_per_task"]) == (3, 3, 1) and "pass@1" in result
    rows = [json.loads(x) for x in (tmp_path / "eval/doubled.jsonl").read_text().splitlines()]
    assert [r["prompt"][0]["content"] for r in rows] == [
        doubled.prompt(name, factor) for name, factor in [("double_it", 2), ("triple_it", 3), ("quadruple_it", 4)]
    ]
    assert all(r["verdict"] in ("passed", "failed", "error", "timeout") for r in rows)
    assert "| doubled | pass@1 |" in (tmp_path / "eval/summary.md").read_text()

    # its tests decide: the references pass, and one wrong answer of three fails
    answers = tmp_path / "answers.jsonl"
    wrong = {"double_it": "def double_it(x):\n    return x + 2\n"}
    answers.write_text(
        "".join(
            json.dumps({"task_id": t.task_id, "completion": wrong.get(t.entry_point, t.reference)}) + "\n"
            for t in doubled.load(recipe, None)
        )
    )
    scored = score_completions_file(answers, "doubled", recipe=recipe, out_dir=tmp_path / "scores")
    assert scored["results"]["completions"]["doubled"]["pass@1"] == pytest.approx(200 / 3)


def test_a_new_suite_with_texts_decontaminates_training_data(doubled, tiny_dir, tmp_path):
    from codetune.prepare import prepare

    recipe = load_recipe("tiny-cpu", ["data.decontaminate=[doubled]"])
    stats = prepare(recipe, tmp_path / "run", log=lambda *a: None).stats
    found = [json.loads(x) for x in (tmp_path / "run/data/decontaminated.jsonl").read_text().splitlines()]
    # every member of the scale family in the training split (15 or more) is dropped, nothing else
    assert stats["rows"]["decontaminated"] == {"doubled": len(found)} and len(found) >= 15
    assert {f["against"] for f in found} == {"doubled"}
