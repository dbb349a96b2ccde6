"""Evaluation, generation and chat on a trained tiny run, end to end through the CLI and the Python API."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import codetune
from codetune.cli import app
from codetune.generate import generate, load_for_inference
from codetune.recipe import RecipeError

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


def test_eval_cli_writes_per_sample_lines_and_summaries(run_dir):
    res = runner.invoke(
        app,
        [
            "eval",
            str(run_dir),
            "--suite",
            "rouge",
            "--suite",
            "starter",
            "--compare-base",
            "--set",
            "evaluation.samples=8",
            "--set",
            "generation.max_new_tokens=48",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((run_dir / "eval/summary.json").read_text())
    assert set(summary["results"]) == {"fine-tuned", "base"}
    tuned, base = summary["results"]["fine-tuned"], summary["results"]["base"]
    assert tuned["rouge"]["samples"] == 8 and 0 <= tuned["rouge"]["rougeL"] <= 100
    # starter tasks the run trained on are never scored: only its held-out test tasks are
    n_test = tuned["starter"]["tasks"]
    # held out only: tiny-cpu's 10% test split of the 624 starter tasks
    assert n_test == 63 and tuned["starter"]["n_per_task"] == 1 and "pass@1" in tuned["starter"]
    assert base["starter"]["tasks"] == n_test
    lines = [json.loads(x) for x in (run_dir / "eval/starter.jsonl").read_text().splitlines()]
    assert len(lines) == n_test
    assert {"task_id", "prompt", "reference", "completion", "scores", "verdict", "error"} <= lines[0].keys()
    assert all(x["verdict"] in {"passed", "failed", "timeout", "killed", "error"} for x in lines)
    rouge_lines = [json.loads(x) for x in (run_dir / "eval/rouge.jsonl").read_text().splitlines()]
    assert len(rouge_lines) == 8 and set(rouge_lines[0]["scores"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert (run_dir / "eval/base/rouge.jsonl").is_file()
    md = (run_dir / "eval/summary.md").read_text()
    assert "| rougeL |" in md and "fine-tuned" in md and "base" in md and "pass@1" in md
    # the base model without the adapter answers differently from the fine-tuned one
    base_lines = [json.loads(x) for x in (run_dir / "eval/base/rouge.jsonl").read_text().splitlines()]
    assert [x["completion"] for x in base_lines] != [x["completion"] for x in rouge_lines]


def test_batched_generation_equals_one_at_a_time_under_greedy(run_dir):
    loaded = load_for_inference(run_dir)
    cfg = loaded.recipe.generation.model_copy(update={"do_sample": False, "max_new_tokens": 40})
    convs = [
        [{"role": "user", "content": f"Write a Python function `f{i}(x)` that returns x times {i}."}] for i in range(6)
    ]
    batched = generate(loaded.model, loaded.tokenizer, convs, cfg, batch_size=6)
    alone = [generate(loaded.model, loaded.tokenizer, [c], cfg, batch_size=1)[0] for c in convs]
    assert batched == alone
    assert loaded.tokenizer.padding_side == "right"  # restored after left-padded generation


def test_python_api(run_dir):
    coder = codetune.load(run_dir)
    one = coder.generate("Write a Python function `double(x)` that returns 2 * x.", max_new_tokens=24)
    assert isinstance(one, str)
    many = coder.generate(["Write `a(x)`.", "Write `b(x)`."], max_new_tokens=8)
    assert isinstance(many, list) and len(many) == 2
    reply = coder.chat([{"role": "user", "content": "Write `c(x)`."}], max_new_tokens=8, do_sample=False)
    assert reply == coder.generate("Write `c(x)`.", max_new_tokens=8, do_sample=False)
    streamed = "".join(coder.stream([{"role": "user", "content": "Write `c(x)`."}], max_new_tokens=8, do_sample=False))
    assert streamed.strip() == reply
    with pytest.raises(Exception, match="temperature"):
        coder.generate("x", temperature=-1)
    with pytest.raises(Exception, match="top_p"):
        coder.generate("x", top_p=2.0)


def test_the_lower_level_api_loads_without_the_libraries_chatter(run_dir):
    # README's InferenceSession snippet: no loading bar, no FutureWarning, only what it prints
    script = (
        "from codetune.generate import InferenceSession, load_for_inference\n"
        f"session = InferenceSession.from_loaded(load_for_inference({str(run_dir)!r}))\n"
        "answers = session.generate([[{'role': 'user', 'content': 'Hi'}]], session.config(max_new_tokens=4))\n"
        "print(len(answers) == 1)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == "True\n" and res.stderr == "", res.stderr[-2000:]


def test_clear_errors(run_dir, tmp_path):
    # a run directory without an adapter
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained/recipe.yaml").write_text((run_dir / "recipe.yaml").read_text())
    with pytest.raises(RecipeError, match="has no trained adapter"):
        load_for_inference(tmp_path / "untrained")
    res = runner.invoke(app, ["generate", str(tmp_path / "untrained"), "--prompt", "hi"])
    assert res.exit_code == 2 and "has no trained adapter" in res.output
    # a prompt longer than the context
    loaded = load_for_inference(run_dir)
    huge = [[{"role": "user", "content": "word " * 5000}]]
    with pytest.raises(RecipeError, match=r"prompt has \d+ tokens: the model's context is 1024 tokens"):
        generate(loaded.model, loaded.tokenizer, huge, loaded.recipe.generation)
    # sampling parameters out of range, through the CLI
    res = runner.invoke(app, ["generate", str(run_dir), "--prompt", "hi", "--set", "generation.top_k=-3"])
    assert res.exit_code == 2 and "generation.top_k" in res.output


def test_generate_cli_file_of_prompts(run_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Write `a(x)`."})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Write `b(x)`."}]})
        + "\n"
    )
    res = runner.invoke(
        app,
        [
            "generate",
            str(run_dir),
            "--file",
            str(prompts),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--set",
            "generation.max_new_tokens=8",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["completion"], str) for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt"}) + "\n")
    res = runner.invoke(app, ["generate", str(run_dir), "--file", str(bad)])
    assert res.exit_code == 2 and "row 1, field 'prompt'" in res.output


def test_chat_streams_and_keeps_history(run_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = (
        b"Write a Python function `double(x)` that returns 2 * x.\n/reset\n"
        b"\xff\xfe not UTF-8\n"
        b"```python\ndef half(x):\n    return x // 2\n```\n/exit\nnever read\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "codetune.cli", "chat", str(run_dir), "--set", "generation.max_new_tokens=12"],
        input=script,
        env=env,
        capture_output=True,
        timeout=300,
    )
    stdout, stderr = res.stdout.decode(), res.stderr.decode()
    assert res.returncode == 0, stderr[-2000:]
    answers = [line.split("model> ", 1)[1] for line in stdout.splitlines() if "model> " in line]
    # two turns: the first prompt, and the fenced code block as one message (a tiny model may answer
    # that one with its end token at once: an empty answer is still one turn)
    assert len(answers) == 2 and answers[0].strip()
    assert "(conversation cleared)" in stderr
    assert "input line 3 is not UTF-8" in stderr and "Traceback" not in stderr


def test_scoring_completions_made_elsewhere(tmp_path):
    from codetune.suites import load_humaneval

    problems = load_humaneval()[:3]
    path = tmp_path / "completions.jsonl"
    with path.open("w") as fh:
        for p in problems:  # two samples each: the canonical body, and a wrong one
            fh.write(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n")
            fh.write(json.dumps({"task_id": p["task_id"], "completion": "    return None\n"}) + "\n")
    res = runner.invoke(
        app, ["eval", "--completions", str(path), "--suite", "humaneval", "--out", str(tmp_path / "scores")]
    )
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "scores/summary.json").read_text())["results"]["completions"]["humaneval"]
    assert result["tasks"] == 3 and result["n_per_task"] == 2 and result["missing_tasks"] == 161
    assert result["pass@1"] == pytest.approx(50.0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "HumanEval/999", "completion": "x"}) + "\n")
    res = runner.invoke(app, ["eval", "--completions", str(bad), "--suite", "humaneval"])
    assert res.exit_code == 2 and "row 1, field 'task_id'" in res.output
