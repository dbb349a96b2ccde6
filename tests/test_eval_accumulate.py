"""Honest evaluation outputs (issue 15): a partial suite says so everywhere, the held-out starter tasks travel
with a merged model (or the scores say they are not known to be held out), and results accumulate per
suite, with results made from another adapter dropped."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from codetune.cli import app
from codetune.errors import OutputError
from codetune.recipe import load_recipe

FAST = ["generation.max_new_tokens=8", "evaluation.samples=2", "evaluation.sandbox=auto"]


def _humaneval_bodies(path: Path, count: int) -> None:
    from codetune.suites import load_humaneval

    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in load_humaneval()[:count]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------
# Partial suites


def test_a_partial_suite_is_labelled_partial_in_the_table_summary_and_markdown(tmp_path):
    answers = tmp_path / "four.jsonl"
    _humaneval_bodies(answers, 4)
    res = CliRunner().invoke(
        app,
        ["eval", "--completions", str(answers), "--suite", "humaneval", "--out", str(tmp_path / "scores")],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    assert "humaneval (partial: 4 of 164 tasks)" in res.output
    result = json.loads((tmp_path / "scores/summary.json").read_text())["results"]["completions"]["humaneval"]
    assert (result["tasks"], result["tasks_in_suite"], result["partial"]) == (4, 164, True)
    assert result["pass@1"] == 100.0
    md = (tmp_path / "scores/summary.md").read_text()
    assert "| humaneval (partial: 4 of 164 tasks) | pass@1 |" in md


def test_a_partial_suite_is_not_published_as_the_suites_score():
    from codetune.card import _eval_results
    from codetune.evaluate import summary_markdown

    full = {"tasks": 164, "tasks_in_suite": 164, "partial": False, "pass@1": 10.0, "parse_rate": 90.0}
    part = {"tasks": 4, "tasks_in_suite": 500, "partial": True, "pass@1": 75.0, "parse_rate": 100.0}
    unknown = {"tasks": 200, "tasks_in_suite": 200, "partial": False, "held_out": False, "pass@1": 50.0}
    summary = {"results": {"fine-tuned": {"humaneval": full, "mbpp": part, "starter": unknown}}}
    names = {r.dataset_type for r in _eval_results(summary, "codetune-starter")}
    assert names == {"openai_humaneval"}  # neither the partial MBPP score nor the starter one of unknown tasks
    md = summary_markdown(summary["results"], "t")
    assert "| humaneval | pass@1 |" in md
    assert "| mbpp (partial: 4 of 500 tasks) | pass@1 |" in md
    assert "| starter (not known to be held out) | pass@1 |" in md


def test_the_report_names_a_partial_suites_task_count():
    from codetune.report import eval_tables

    part = {"tasks": 4, "tasks_in_suite": 164, "partial": True, "missing_tasks": 160, "pass@1": 75.0}
    assert "partial: 4 of 164 tasks" in eval_tables({"results": {"completions": {"humaneval": part}}})


# ---------------------------------------------------------------------------------------
# The held-out set travels with a merged model


@pytest.fixture(scope="module")
def merged_dir(tiny_run, tmp_path_factory):
    from codetune.export import merge

    return merge(tiny_run, tmp_path_factory.mktemp("merged") / "merged", dtype="float32", log=lambda *a: None)


def _scored_ids(folder: Path, suite: str = "starter") -> set[str]:
    return {json.loads(line)["task_id"] for line in (folder / f"{suite}.jsonl").read_text().splitlines()}


def test_merge_records_the_trained_tasks_and_eval_of_the_merged_folder_leaves_them_out(tiny_run, merged_dir, tmp_path):
    from codetune.data import trained_task_ids
    from codetune.evaluate import evaluate
    from codetune.rundir import HELDOUT_RECORD, RunDir

    trained = trained_task_ids(tiny_run)
    assert trained, "the tiny run trains on starter tasks"
    record = json.loads((merged_dir / HELDOUT_RECORD).read_text())
    assert set(record["trained_task_ids"]) == trained
    assert record["adapter_sha256"] == RunDir(tiny_run).adapter_fingerprint()

    recipe = load_recipe(tiny_run / "recipe.yaml", FAST)
    summary = evaluate(merged_dir, ["starter"], recipe=recipe, out_dir=tmp_path / "eval")
    result = summary["results"]["model"]["starter"]
    assert result["held_out"] is True
    assert not _scored_ids(tmp_path / "eval") & trained
    assert summary["adapter_sha256"] == record["adapter_sha256"]
    assert "not known to be held out" not in (tmp_path / "eval" / "summary.md").read_text()


def test_a_model_folder_without_the_record_is_labelled_not_held_out(tiny_run, merged_dir, tmp_path):
    from codetune.data import trained_task_ids
    from codetune.evaluate import evaluate
    from codetune.rundir import HELDOUT_RECORD

    bare = tmp_path / "bare"
    shutil.copytree(merged_dir, bare)
    (bare / HELDOUT_RECORD).unlink()
    recipe = load_recipe(tiny_run / "recipe.yaml", FAST)
    summary = evaluate(bare, ["starter"], recipe=recipe, out_dir=tmp_path / "eval")
    result = summary["results"]["model"]["starter"]
    assert result["held_out"] is False
    assert _scored_ids(tmp_path / "eval") >= trained_task_ids(tiny_run)  # nothing to leave out: all are scored
    assert "| starter (not known to be held out) |" in (tmp_path / "eval" / "summary.md").read_text()


# ---------------------------------------------------------------------------------------
# Results accumulate per suite


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the tiny run whose eval/ the test may change (the shared run stays as it is)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval", "merged", "README.md"))
    return run


def test_results_accumulate_per_suite_and_the_card_shows_them_all(run_copy):
    from codetune.card import render_card
    from codetune.evaluate import evaluate

    recipe = load_recipe(run_copy / "recipe.yaml", FAST)
    evaluate(run_copy, ["rouge"], recipe=recipe)
    rouge_lines = (run_copy / "eval" / "rouge.jsonl").read_bytes()
    summary = evaluate(run_copy, ["starter"], recipe=recipe)  # a new suite needs no --overwrite
    assert summary["suites"] == ["rouge", "starter"]
    on_disk = json.loads((run_copy / "eval" / "summary.json").read_text())
    assert set(on_disk["results"]["fine-tuned"]) == {"rouge", "starter"}
    assert on_disk["results"]["fine-tuned"]["rouge"]["samples"] == 2
    assert (run_copy / "eval" / "rouge.jsonl").read_bytes() == rouge_lines
    assert (run_copy / "eval" / "starter.jsonl").is_file()
    md = (run_copy / "eval" / "summary.md").read_text()
    assert "## ROUGE" in md and "| starter | pass@1 |" in md
    card = render_card(run_copy)
    assert "rougeLsum" in card and "| starter | pass@1 |" in card
    assert "codetune-starter" in card.split("\n---\n", 1)[0]  # the model-index has the starter score


def test_scoring_a_suite_again_needs_overwrite_and_replaces_only_that_suite(run_copy):
    from codetune.evaluate import evaluate

    evaluate(run_copy, ["rouge", "starter"], recipe=load_recipe(run_copy / "recipe.yaml", FAST))
    starter_lines = (run_copy / "eval" / "starter.jsonl").read_bytes()
    more = load_recipe(run_copy / "recipe.yaml", [*FAST, "evaluation.samples=3"])
    with pytest.raises(OutputError, match=r"already has results for rouge: pass --overwrite") as info:
        evaluate(run_copy, ["rouge"], recipe=more)
    # the user gave no --out: the message names the run's results folder, and --out only as a way elsewhere
    assert str(info.value).startswith(f"results folder {run_copy / 'eval'} already has")
    assert str(info.value).endswith("or write the results elsewhere with --out DIR")
    with pytest.raises(OutputError, match=r"^--out .* already has results for rouge: .*choose another --out$"):
        evaluate(run_copy, ["rouge"], recipe=more, out_dir=run_copy / "eval")
    summary = evaluate(run_copy, ["rouge"], recipe=more, overwrite=True)
    assert summary["suites"] == ["rouge", "starter"]
    assert summary["results"]["fine-tuned"]["rouge"]["samples"] == 3
    assert len((run_copy / "eval" / "rouge.jsonl").read_text().splitlines()) == 3
    assert (run_copy / "eval" / "starter.jsonl").read_bytes() == starter_lines


def test_results_from_another_adapter_are_dropped_with_a_line(run_copy):
    from codetune.evaluate import evaluate
    from codetune.rundir import RunDir

    recipe = load_recipe(run_copy / "recipe.yaml", FAST)
    summary = evaluate(run_copy, ["starter"], recipe=recipe)
    sha = RunDir(run_copy).adapter_fingerprint()
    assert summary["adapter_sha256"] == sha
    assert summary["results"]["fine-tuned"]["starter"]["adapter_sha256"] == sha
    # as if the starter results had been made before the adapter was trained again
    path = run_copy / "eval" / "summary.json"
    old = json.loads(path.read_text())
    old["results"]["fine-tuned"]["starter"]["adapter_sha256"] = "0" * 64
    path.write_text(json.dumps(old))
    buf = io.StringIO()
    summary = evaluate(run_copy, ["rouge"], recipe=recipe, console=Console(file=buf, width=200))
    assert summary["suites"] == ["rouge"]
    assert set(summary["results"]["fine-tuned"]) == {"rouge"}
    assert not (run_copy / "eval" / "starter.jsonl").exists()
    assert "dropping the earlier results for starter: made from another adapter or model" in buf.getvalue()


def test_the_cli_adds_a_suite_and_refuses_to_score_one_again_without_overwrite(run_copy):
    from codetune.evaluate import evaluate

    evaluate(run_copy, ["rouge"], recipe=load_recipe(run_copy / "recipe.yaml", FAST))
    before = (run_copy / "eval" / "summary.json").read_bytes()
    sets = [arg for s in FAST for arg in ("--set", s)]
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(run_copy), "--suite", "rouge", *sets], env={"COLUMNS": "200"})
    assert res.exit_code != 0 and "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "already has results for rouge" in errors[0] and "--overwrite" in errors[0]
    assert (run_copy / "eval" / "summary.json").read_bytes() == before
    args = ["eval", str(run_copy), "--suite", "starter", "--no-compare-base", *sets]
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "rougeL" in res.output and "starter" in res.output  # the table shows the earlier suite too
