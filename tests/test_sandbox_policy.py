"""evaluation.sandbox (strict | auto), the fallback warning, and where the isolation level is recorded."""

import pytest

from codetune import sandbox
from codetune.card import _sandbox_levels
from codetune.evaluate import summary_markdown
from codetune.recipe import RecipeError, load_recipe
from codetune.suites import score_suite
from codetune.suites.starter import starter_tasks


@pytest.fixture
def fallback(monkeypatch):
    """This machine's plan, reported as the process-level fallback (what a clone without bwrap gets)."""
    plan, report = sandbox._get_plan()
    monkeypatch.setattr(sandbox, "_get_plan", lambda: (plan, {**report, "level": "process", "notes": "no bwrap"}))


def test_the_setting_is_validated_and_defaults_to_auto():
    assert load_recipe("tiny-cpu").evaluation.sandbox == "auto"
    assert load_recipe("tiny-cpu", ["evaluation.sandbox=strict"]).evaluation.sandbox == "strict"
    with pytest.raises(RecipeError, match="evaluation.sandbox"):
        load_recipe("tiny-cpu", ["evaluation.sandbox=none"])


def test_strict_refuses_the_fallback_before_running_anything(fallback, tmp_path):
    task = starter_tasks()[0]
    recipe = load_recipe("tiny-cpu", ["evaluation.sandbox=strict"])
    refused = r"evaluation.sandbox: 'strict' needs the 'bwrap' isolation level but this machine gives 'process'"
    with pytest.raises(RecipeError, match=refused):
        score_suite("starter", [task], [[task.reference]], recipe, tmp_path)
    assert not (tmp_path / "starter.jsonl").exists()


def test_auto_warns_loudly_and_records_the_level(fallback, tmp_path, caplog):
    task = starter_tasks()[0]
    with caplog.at_level("WARNING", logger="codetune.sandbox"):
        summary = score_suite("starter", [task], [[task.reference]], load_recipe("tiny-cpu"), tmp_path)
    assert "WARNING: the code sandbox runs at the 'process' level" in caplog.text
    assert summary["sandbox"] == "process" and summary["pass@1"] == 100.0
    results = {"model": {"starter": summary}}
    assert "isolation level: process" in summary_markdown(results, "t")
    assert _sandbox_levels({"results": results}) == " (isolation level: process)"


def test_the_level_in_use_is_recorded(tmp_path):
    task = starter_tasks()[0]
    summary = score_suite("starter", [task], [[task.reference]], load_recipe("tiny-cpu"), tmp_path)
    assert summary["sandbox"] == sandbox.isolation_report()["level"]
