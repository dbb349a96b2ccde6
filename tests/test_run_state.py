"""A run directory's recipe is the source of truth once the run exists, and nothing made from an
earlier adapter is reused or left behind."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from codetune.cli import app
from codetune.rundir import MARKER, RunDir, marker_text, read_marker

runner = CliRunner()
QUICK = ["--set", "training.eval_steps=null", "--set", "training.logging_steps=1"]


def _cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, tiny_dir):
    """A tiny run started with --set training.max_steps=4 (checkpoints every 2 steps)."""
    run = tmp_path_factory.mktemp("state") / "run"
    res = _cli("train", "tiny-cpu", "--run-dir", run, "--set", "training.max_steps=4", "--set", "training.save_steps=2",
               *QUICK)
    assert res.exit_code == 0, res.output
    return run


def test_resume_continues_with_the_runs_own_recipe(four_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    saved = (run / "recipe.yaml").read_bytes()
    # a crash after checkpoint-2: later checkpoints and the adapter never got written
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    res = _cli("train", "tiny-cpu", "--run-dir", run, "--resume")  # no --set: the shipped recipe has no max_steps
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.output and "checkpoint-2" in res.output
    assert (run / "recipe.yaml").read_bytes() == saved
    assert json.loads((run / "train_summary.json").read_text())["global_step"] == 4


def test_resuming_a_finished_run_trains_nothing(four_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = _cli("train", "tiny-cpu", "--run-dir", run, "--resume")
    assert res.exit_code == 0, res.output
    assert "finished training at step 4: nothing to resume" in res.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_set_that_contradicts_a_trained_run_is_refused(four_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for cmd in (["train", "--resume"], ["run", "--resume"], ["train"]):
        res = _cli(cmd[0], "tiny-cpu", "--run-dir", run, *cmd[1:], "--set", "training.learning_rate=0.001")
        assert res.exit_code == 2, (cmd, res.output)
        assert "training.learning_rate: 0.004 -> 0.001" in res.output and "Traceback" not in res.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_train_after_prepare_trains_what_was_prepared(tiny_dir, tmp_path):
    run = tmp_path / "run"
    res = _cli("prepare", "tiny-cpu", "--run-dir", run, "--set", "data.max_length=256")
    assert res.exit_code == 0, res.output
    res = _cli("train", "tiny-cpu", "--run-dir", run, "--set", "training.max_steps=2", *QUICK)
    assert res.exit_code == 0, res.output
    assert "preparing data" not in res.output
    saved = (run / "recipe.yaml").read_text()
    assert "max_length: 256" in saved and "max_steps: 2" in saved


def _derived(run):
    (run / "eval").mkdir()
    (run / "eval" / MARKER).write_text(marker_text("eval"))
    (run / "eval" / "summary.json").write_text("{}")
    (run / "merged").mkdir()
    (run / "merged" / MARKER).write_text(marker_text("merged"))
    (run / "README.md").write_text("---\ntags:\n- codetune\n---\n# card\n")
    (run / "report.html").write_text('<!doctype html><head><meta name="generator" content="codetune"></head>')
    (run / "model-f16.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    return [run / n for n in ("eval", "merged", "README.md", "report.html", "model-f16.gguf")]


def test_starting_over_removes_what_the_old_adapter_made_and_nothing_else(four_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    derived = _derived(run)
    mine = [run / "notes.txt", run / "other.gguf", run / "mine" / "summary.json"]
    mine[0].write_text("my notes")
    mine[1].write_text("not a gguf file")
    mine[2].parent.mkdir()
    mine[2].write_text("{}")
    res = _cli("train", "tiny-cpu", "--run-dir", run, "--overwrite", "--set", "training.max_steps=2", *QUICK)
    assert res.exit_code == 0, res.output
    assert not any(p.exists() for p in derived), [p for p in derived if p.exists()]
    assert all(p.exists() for p in mine)
    assert json.loads((run / "train_summary.json").read_text())["global_step"] == 2


def test_export_rebuilds_a_merged_model_made_from_another_adapter(four_steps, tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    rd = RunDir(run)
    res = _cli("merge", run)
    assert res.exit_code == 0, res.output
    first = read_marker(rd.merged)["adapter_sha256"]
    assert first == rd.adapter_fingerprint()
    weights = rd.adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v + 0.01 for k, v in tensors.items()}, weights)  # as if trained again
    res = _cli("export", run, "--format", "gguf", "--outtype", "f32")
    assert res.exit_code == 0, res.output
    assert "merging again" in res.output
    assert read_marker(rd.merged)["adapter_sha256"] == rd.adapter_fingerprint() != first
    assert (run / "model-f32.gguf").read_bytes()[:4] == b"GGUF"


def test_the_card_refuses_scores_of_another_adapter(four_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    (run / "eval").mkdir()
    (run / "eval" / MARKER).write_text(marker_text("eval"))
    summary = {"source": str(run), "suites": [], "results": {"fine-tuned": {}}, "adapter_sha256": "0" * 64}
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    (run / "eval" / "summary.md").write_text("# Evaluation\n")
    res = _cli("card", run)
    assert res.exit_code == 2 and "scores another adapter" in res.output, res.output
    assert not (run / "README.md").exists()
    summary["adapter_sha256"] = RunDir(run).adapter_fingerprint()
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    res = _cli("card", run)
    assert res.exit_code == 0, res.output
