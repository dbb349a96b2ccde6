"""codetune.pipeline: the library owns prepare -> train -> evaluate -> card, checks come first and once."""

import pytest

import codetune
from codetune import pipeline
from codetune.errors import CodetuneError
from codetune.recipe import RecipeError
from codetune.rundir import RunDir

QUICK = dict(
    training__max_steps=4,
    training__eval_steps="null",
    training__save_strategy="no",
    evaluation__suites="[rouge]",
    evaluation__compare_base="false",
    evaluation__samples=4,
)


def test_codetune_run_chains_every_stage(tmp_path, tiny_dir):
    result = codetune.run("tiny-cpu", tmp_path / "run", **QUICK)
    rd = RunDir(tmp_path / "run")
    assert result.run_dir == rd.path and result.recipe.training.max_steps == 4
    assert result.prepared.data_dir == rd.data and rd.stats.is_file()
    assert result.trained.global_step == 4 and rd.adapter_config.is_file()
    assert set(result.summary["results"]["fine-tuned"]) == {"rouge"} and rd.eval_summary.is_file()
    assert result.card == rd.card and "codetune" in rd.card.read_text()


def test_checks_run_before_anything_is_written(tmp_path, tiny_dir):
    """A LoRA target the model lacks fails in the checks: no run directory is created, no data prepared."""
    target = tmp_path / "never"
    with pytest.raises(RecipeError, match="lora.target_modules"):
        pipeline.run("tiny-cpu", target, overrides=["lora.target_modules=[q_proj]"])
    assert not target.exists()


def test_a_bad_source_on_overwrite_keeps_the_earlier_training(tmp_path, tiny_dir):
    """--overwrite deletes the earlier training only once the new data is in place: a source that cannot
    be read, or one with an invalid row (issue 21 D3), leaves the adapter, checkpoints, metrics and recipe
    as they were."""
    import json

    run = tmp_path / "run"
    pipeline.train("tiny-cpu", run, overrides=["training.max_steps=2", "training.eval_steps=null"])
    rd = RunDir(run)
    kept = [rd.adapter / "adapter_model.safetensors", rd.recipe_file, rd.metrics, rd.train_summary, rd.stats]
    kept += [p for p in rd.checkpoints.rglob("*") if p.is_file()]
    before = {p: p.read_bytes() for p in kept}
    with pytest.raises(CodetuneError, match="missing.jsonl"):
        pipeline.train("tiny-cpu", run, overrides=["data.source=missing.jsonl"], overwrite=True)
    assert {p: p.read_bytes() for p in before} == before
    invalid = tmp_path / "invalid.jsonl"
    rows = [{"instruction": f"Task {i}", "output": f"x = {i}"} for i in range(20)] + [{"instruction": "no output"}]
    invalid.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(CodetuneError, match="invalid.jsonl, row 21, field 'output'"):
        pipeline.train("tiny-cpu", run, overrides=[f"data.source={invalid}"], overwrite=True)
    assert {p: p.read_bytes() for p in before} == before


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(CodetuneError, match="--resume and --overwrite"):
        pipeline.run("tiny-cpu", tmp_path / "run", resume=True, overwrite=True)
    assert not (tmp_path / "run").exists()
