"""`codetune rl` (issue 20, first part): GRPO through TRL's GRPOTrainer on a trained run's adapter, rewarded by
the sandbox. A smoke run on the tiny model: it must train the adapter (rl/adapter differs from adapter/),
log the reward's view of every step, and refuse what cannot work before a model loads."""

import json
import shutil

import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from codetune.cli import app
from codetune.recipe import load_recipe
from codetune.rl import rl_tasks

runner = CliRunner()
QUICK = [
    "rl.max_steps=2",
    "rl.num_generations=2",
    "rl.prompts_per_step=2",
    "rl.max_completion_length=24",
    "rl.max_tasks=4",
    "rl.learning_rate=0.01",
]


@pytest.fixture
def run(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("rl", "eval"))
    return copy


def test_rl_trains_the_adapter_and_logs_every_step(run):
    settings = [*QUICK, "rl.format_reward=0.5"]
    res = runner.invoke(app, ["rl", str(run), *sum((["--set", s] for s in settings), [])])
    assert res.exit_code == 0, res.output
    assert "rl step 1 |" in res.output and "rl step 2 |" in res.output
    sft = load_file(run / "adapter" / "adapter_model.safetensors")
    after = load_file(run / "rl" / "adapter" / "adapter_model.safetensors")
    assert sft.keys() == after.keys() and all(after[k].dtype == sft[k].dtype for k in sft)  # lora.dtype kept
    lines = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert line["completions"] == 4 and sum(line["verdicts"].values()) == 4
        assert 0.0 <= line["reward"] <= 1.5 and "frac_reward_zero_std" in line
        assert line["heldback_pass_rate"] is not None  # every starter task holds a test back
        # TRL's reward is the tests' (all_pass: 1 or 0) plus 0.5 for each well-formed answer
        assert line["masked"] == 0 and 0.0 <= line["formed_rate"] <= 1.0
        assert line["reward"] == pytest.approx(line["rewarded_pass_rate"] + 0.5 * line["formed_rate"])
    summary = json.loads((run / "rl" / "rl_summary.json").read_text())
    assert summary["steps"] == 2 and summary["tasks"] == 4 and summary["rl"]["num_generations"] == 2
    assert summary["rl"]["format_reward"] == 0.5
    # the run's own recipe and SFT adapter are untouched
    assert load_recipe(run / "recipe.yaml").rl is None


def test_rewards_that_differ_within_a_group_move_the_weights(run, monkeypatch):
    """The tiny run trained 40 steps passes no task, so every group's rewards are equal and GRPO has nothing
    to learn from (reward_std 0, as logged above). A reward that differs within each group must move the
    adapter through the same trainer."""
    import codetune.rl as rl_mod

    def alternating(tasks_by_id, *, kind, on_scored=None, **_):
        return lambda prompts, completions, task_id, **kw: [float(i % 2) for i in range(len(completions))]

    monkeypatch.setattr(rl_mod, "reward_function", alternating)
    res = runner.invoke(app, ["rl", str(run), *sum((["--set", s] for s in QUICK), [])])
    assert res.exit_code == 0, res.output
    sft = load_file(run / "adapter" / "adapter_model.safetensors")
    after = load_file(run / "rl" / "adapter" / "adapter_model.safetensors")
    assert any((sft[k] != after[k]).any() for k in sft)
    lines = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["reward_std"] > 0 and lines[0]["grad_norm"] > 0


def test_fresh_rl_tasks_are_new_members_of_the_taught_families_in_turn(run):
    from codetune.data import trained_task_ids
    from codetune.family_tasks import fresh_rl_rows
    from codetune.starter import load_starter

    family = {r["task_id"]: r.get("family") for r in load_starter()}
    taught = sorted({family[t] for t in trained_task_ids(run) if family[t]})
    recipe = load_recipe(run / "recipe.yaml", ["rl.tasks=fresh", "rl.max_tasks=25"])
    tasks = rl_tasks(recipe, run)
    assert len(tasks) == 25 and all(t.task.task_id.startswith("fresh/") for t in tasks)
    # a family after another, in turn: the first 25 hold every taught family
    of = {r["entry_point"]: r["family"] for r in fresh_rl_rows(3, families=taught)}
    assert {of[t.task.entry_point] for t in tasks} == set(taught) and len(taught) == 11
    assert all(len(t.rewarded) >= 2 and len(t.heldback) == 1 for t in tasks)


def test_rl_tasks_are_the_runs_training_tasks_with_held_back_tests(run):
    from codetune.data import trained_task_ids

    recipe = load_recipe(run / "recipe.yaml")
    tasks = rl_tasks(recipe, run)
    assert tasks and {t.task.task_id for t in tasks} <= trained_task_ids(run)
    assert all(len(t.rewarded) >= 2 and len(t.heldback) == 1 for t in tasks)


def test_rl_refuses_what_cannot_work_before_a_model_loads(run, tmp_path):
    res = runner.invoke(app, ["rl", str(run), "--set", "training.learning_rate=1"])
    assert res.exit_code == 2 and "takes rl.* settings only" in res.output
    res = runner.invoke(app, ["rl", str(run), "--set", "rl.prompts_per_step=100000"])
    assert res.exit_code == 2 and "rl.prompts_per_step 100000 is more than" in res.output
    res = runner.invoke(app, ["rl", str(run), "--set", "rl.loss_type=ppo"])
    assert res.exit_code == 2 and "rl.loss_type" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["rl", str(empty)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    # TRL's vLLM server mode needs vLLM in this process, which codetune's pins rule out: said before any work,
    # by `codetune rl` and by `codetune run` before its SFT
    res = runner.invoke(app, ["rl", str(run), "--set", "rl.rollouts=vllm"])
    assert res.exit_code == 2 and "imports vLLM in the training process" in res.output
    assert "transformers<5.21" in res.output
    fresh = tmp_path / "fresh-run"
    res = runner.invoke(app, ["run", "tiny-cpu-rl", "--run-dir", str(fresh), "--set", "rl.rollouts=vllm"])
    assert res.exit_code == 2 and "rl.rollouts vllm" in res.output and not fresh.exists()
    # CODETUNE_SET's rl.* items apply (this one is refused by name) and its other items are the other stages'
    res = runner.invoke(app, ["rl", str(run)], env={"CODETUNE_SET": "training.max_steps=6 rl.prompts_per_step=100000"})
    assert res.exit_code == 2 and "rl.prompts_per_step 100000 is more than" in res.output
    assert not (run / "rl").exists()


def test_the_difficulty_filter_keeps_the_tasks_passed_sometimes_but_not_always(run, monkeypatch):
    """The filter samples through codetune's generation and scores through the reward; here the scoring is
    scripted per task (always, never, every other sample) so what it keeps is known."""
    import codetune.reward as reward_mod
    from codetune.model import load_base_model
    from codetune.reward import Reward
    from codetune.rl import difficulty_filter

    recipe = load_recipe(run / "recipe.yaml", [*QUICK, "rl.filter_samples=4"])
    tasks = rl_tasks(recipe, run)
    plan = {t.task.task_id: ("always", "never", "sometimes", "sometimes")[i % 4] for i, t in enumerate(tasks)}

    def scripted(reward_tasks, texts, kind="all_pass", **_):
        assert len(texts) == 4 * len(tasks) and all(isinstance(t, str) for t in texts)
        out = []
        for i, rt in enumerate(reward_tasks):
            value = {"always": 1.0, "never": 0.0, "sometimes": float(i % 2)}[plan[rt.task.task_id]]
            out.append(Reward(value, "passed" if value else "failed", None, (), ""))
        return out

    monkeypatch.setattr(reward_mod, "score", scripted)
    from peft import PeftModel

    from codetune.model import load_tokenizer

    model = PeftModel.from_pretrained(load_base_model(recipe), str(run / "adapter"))
    found = difficulty_filter(model, load_tokenizer(recipe), recipe, tasks)
    assert [t.task.task_id for t in found.kept] == [t for t, p in plan.items() if p == "sometimes"]
    assert found.counts() == {"candidates": 4, "kept": 2, "always_passed": 1, "never_passed": 1}
    assert found.rates == {t: {"always": 1.0, "never": 0.0, "sometimes": 0.5}[p] for t, p in plan.items()}


def test_a_filter_that_leaves_too_few_tasks_is_one_error_and_one_sample_is_refused(run):
    # the 40-step tiny run passes none of its tasks: nothing has reward spread
    res = runner.invoke(app, ["rl", str(run), *sum((["--set", s] for s in [*QUICK, "rl.filter_samples=2"]), [])])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "rl.filter_samples: the starting policy passed 0 task(s) sometimes" in " ".join(res.output.split())
    assert "difficulty filter: kept 0 of 4 tasks" in res.output
    assert json.loads((run / "rl" / "filter.json").read_text())["samples"] == 2
    assert not (run / "rl" / "adapter").exists()
    res = runner.invoke(app, ["rl", str(run), "--set", "rl.filter_samples=1"])
    assert res.exit_code == 2 and "needs 2 or more" in " ".join(res.output.split())


def test_eval_scores_the_rl_adapter_into_rl_eval_and_leaves_the_sft_results(run):
    res = runner.invoke(app, ["eval", str(run), "--adapter", "rl", "--suite", "starter-family"])
    assert res.exit_code == 2 and "rl/adapter is missing): run `codetune rl` first" in " ".join(res.output.split())
    res = runner.invoke(app, ["rl", str(run), *sum((["--set", s] for s in QUICK), [])])
    assert res.exit_code == 0, res.output
    settings = ["--set", "generation.max_new_tokens=8", "--set", "evaluation.batch_size=64"]
    res = runner.invoke(app, ["eval", str(run), "--suite", "starter-family", *settings])
    assert res.exit_code == 0, res.output
    sft = json.loads((run / "eval" / "summary.json").read_text())
    res = runner.invoke(app, ["eval", str(run), "--adapter", "rl", "--suite", "starter-family", *settings])
    assert res.exit_code == 0, res.output
    assert f"results  -> {run / 'rl' / 'eval'}" in res.output
    rl = json.loads((run / "rl" / "eval" / "summary.json").read_text())
    assert json.loads((run / "eval" / "summary.json").read_text()) == sft  # untouched
    assert rl["adapter_sha256"] != sft["adapter_sha256"]
    res = runner.invoke(app, ["generate", str(run), "--adapter", "rl", "--prompt", "hi", *settings])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", "builtin:tiny-phi3", "--adapter", "rl", "--out", str(run / "x")])
    assert res.exit_code == 2 and "is not a run directory; only a run has an rl adapter" in res.output


def test_codetune_run_runs_grpo_when_the_recipe_has_rl_and_evaluates_both_adapters(tmp_path, monkeypatch):
    """tiny-cpu-rl, shortened (its SFT to 20 steps, GRPO to 2, no difficulty filter: a model trained 20 steps
    passes nothing, so the filter would keep no task); its GRPO tasks are fresh members of the taught families."""
    run = tmp_path / "run"
    settings = [
        "training.max_steps=20",
        "training.eval_steps=null",
        "training.save_strategy=no",
        "generation.max_new_tokens=8",
        "evaluation.batch_size=64",
        "evaluation.compare_base=false",
        "evaluation.suites=[starter-family]",
        "rl.filter_samples=0",
        "rl.save_steps=null",
        *QUICK,
    ]
    res = runner.invoke(app, ["run", "tiny-cpu-rl", "--run-dir", str(run), *sum((["--set", s] for s in settings), [])])
    assert res.exit_code == 0, res.output
    assert "rl step 2 |" in res.output and "after GRPO (rl/adapter):" in res.output
    assert json.loads((run / "rl" / "rl_summary.json").read_text())["steps"] == 2
    recipe = load_recipe(run / "recipe.yaml")
    fresh = [t.task.task_id for t in rl_tasks(recipe, run)]
    assert recipe.rl.tasks == "fresh" and len(fresh) == 4 and all(t.startswith("fresh/") for t in fresh)
    sft = json.loads((run / "eval" / "summary.json").read_text())
    rl = json.loads((run / "rl" / "eval" / "summary.json").read_text())
    assert "starter-family" in rl["results"]["fine-tuned"] and rl["adapter_sha256"] != sft["adapter_sha256"]
    assert load_recipe(run / "recipe.yaml").rl.max_steps == 2  # the run's recipe keeps its rl: section
    card = (run / "README.md").read_text()
    section = card.split("## Reinforcement learning (GRPO)", 1)[1].split("\n## ", 1)[0]
    assert "2 steps on 4 tasks" in section and "`all_pass`" in section and "parses" not in section  # no format reward
    sft_score = sft["results"]["fine-tuned"]["starter-family"]["pass@1"]
    rl_score = rl["results"]["fine-tuned"]["starter-family"]["pass@1"]
    assert f"| starter-family | {sft_score:.2f} | {rl_score:.2f} |" in section
    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    page = (run / "report.html").read_text()
    rl_part = page.split("<section id=rl>", 1)[1].split("</section>", 1)[0]
    assert "reward (mean)" in rl_part and "held-back tests passed" in rl_part and "<svg" in rl_part
    assert "Verdicts: " in rl_part and "Rewarded tests passed minus held-back tests passed" in rl_part
    assert f"<td>starter-family</td><td>{sft_score:.2f}</td><td>{rl_score:.2f}</td>" in rl_part
    # scores of another adapter than the rl/adapter there now are not shown: GRPO again (with a reward that
    # differs within groups, so the weights move), then the card
    import codetune.rl as rl_mod

    def alternating(tasks_by_id, *, kind, on_scored=None, **_):
        return lambda prompts, completions, task_id, **kw: [float(i % 2) for i in range(len(completions))]

    monkeypatch.setattr(rl_mod, "reward_function", alternating)
    res = runner.invoke(app, ["rl", str(run), *sum((["--set", s] for s in [*QUICK, "rl.format_reward=0.25"]), [])])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["card", str(run), "--overwrite"])
    assert res.exit_code == 0, res.output
    section = (run / "README.md").read_text().split("## Reinforcement learning (GRPO)", 1)[1].split("\n## ", 1)[0]
    assert "Not evaluated after GRPO" in section and "| starter-family |" not in section
    assert "plus 0.25 for an answer whose code parses and defines the task's function" in section
    res = runner.invoke(app, ["report", str(run), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert "Not evaluated after GRPO" in (run / "report.html").read_text().split("<section id=rl>", 1)[1]


def test_codetune_rollouts_end_with_their_stop_token_or_run_to_the_limit(tiny_run):
    """TRL tells a finished completion from a truncated one by its last id: codetune's rollouts keep the stop
    token that ended a completion, as TRL's own generation does, and the same seed gives the same ids."""
    from codetune.generate import InferenceSession, load_for_inference

    loaded = load_for_inference(tiny_run)
    session = InferenceSession.from_loaded(loaded)
    cfg = session.config(do_sample=True, temperature=1.0, top_k=0, max_new_tokens=12, seed=3)
    prompts = [session.prompt_ids([{"role": "user", "content": f"Write f{i}."}]) for i in range(6)] * 2
    ids = session.completion_ids(prompts, cfg)
    stops = set(session.stop_ids_for(cfg))
    assert all((row and row[-1] in stops and not stops & set(row[:-1])) or len(row) == 12 for row in ids), ids
    assert any(row[-1] in stops for row in ids if row)  # the tiny run does stop, sometimes
    assert session.completion_ids(prompts, cfg) == ids
    texts = session.generate([[{"role": "user", "content": f"Write f{i}."}] for i in range(6)] * 2, cfg)
    decoded = [loaded.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
    assert decoded == texts  # the same answers eval would score


def test_vllm_rollouts_map_to_trls_server_mode():
    from codetune.recipe import RLConfig
    from codetune.rl import _config
    from codetune.rundir import RunDir

    cfg = _config(RLConfig(rollouts="vllm", vllm_server="http://gpu-box:8001"), RunDir("/tmp/unused"), [2], cuda=True)
    assert (cfg.use_vllm, cfg.vllm_mode, cfg.vllm_server_base_url) == (True, "server", "http://gpu-box:8001")
    assert not _config(RLConfig(), RunDir("/tmp/unused"), [2], cuda=False).use_vllm


def test_trls_own_generation_is_still_a_choice(run):
    res = runner.invoke(app, ["rl", str(run), *sum((["--set", s] for s in [*QUICK, "rl.max_steps=1", "rl.rollouts=trl"]), [])])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "rl" / "rl_summary.json").read_text())
    assert summary["rl"]["rollouts"] == "trl" and summary["steps"] == 1


def test_through_the_trainer_a_cheating_policy_gets_nothing_and_a_correct_one_everything(run, tmp_path, monkeypatch):
    """A scripted policy (the trainer's rollout hook returns fixed completions) answers one task with the
    correct code and with every known cheat, in one GRPO group: through GRPOTrainer and the same reward the
    correct answer scores 1 and each cheat 0, none masked, and the cheats' ways in are counted."""
    import codetune.rl as rl_mod
    from codetune.rl import rl

    from .test_reward import CHEATS, CORRECT

    row = next(r for r in __import__("codetune.starter", fromlist=["x"]).load_starter() if r["task_id"] == "starter/0")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"task_id": "palindrome", "prompt": row["instruction"], "tests": row["test_list"],
                                 "entry_point": row["entry_point"]}) + "\n")
    answers = [CORRECT, *CHEATS.values()]
    scored = []

    def scripted(model, tokenizer, recipe):
        stop = tokenizer.convert_tokens_to_ids(recipe.generation.stop_tokens[0])

        def rollout(prompts, trainer):
            assert len(prompts) == len(answers)  # one group: the prompt once per generation
            texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            done = [tokenizer(a, add_special_tokens=False)["input_ids"] + [stop] for a in answers]
            return {"prompt_ids": ids, "completion_ids": done, "logprobs": None}

        return rollout

    real_reward = rl_mod.reward_function

    def recording(tasks_by_id, *, kind, on_scored=None, **kw):
        def seen(rewards):
            scored.extend(rewards)
            on_scored(rewards)

        return real_reward(tasks_by_id, kind=kind, on_scored=seen, **kw)

    monkeypatch.setattr(rl_mod, "codetune_rollouts", scripted)
    monkeypatch.setattr(rl_mod, "reward_function", recording)
    settings = [f"rl.tasks={tasks}", "rl.max_steps=1", f"rl.num_generations={len(answers)}", "rl.prompts_per_step=1",
                "rl.max_completion_length=256"]
    recipe = load_recipe(run / "recipe.yaml", settings)
    rl(recipe, run)
    assert [r.code.strip() for r in scored] == [a.strip().removeprefix("```python\n").removesuffix("```").strip()
                                                for a in answers]
    assert [r.value for r in scored] == [1.0] + [0.0] * len(CHEATS), [(r.verdict, r.value) for r in scored]
    line = json.loads((run / "rl" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["masked"] == 0 and line["verdicts"].get("passed") == 1
    assert line["reward"] == pytest.approx(1 / len(answers))
    assert {"exit", "eq_override", "introspection", "descriptors", "proc"} <= set(line["signals"])


def test_grpo_resumed_after_a_kill_ends_where_an_unbroken_run_ends(run, monkeypatch):
    """Two GRPO steps with a checkpoint after each; then the second step's checkpoint and the adapter are lost
    (a kill) and `codetune rl --resume` continues from the first: the adapter is the same, bit for bit."""
    import codetune.rl as rl_mod

    def alternating(tasks_by_id, *, kind, on_scored=None, **_):  # a reward with spread, so weights move
        return lambda prompts, completions, task_id, **kw: [float(i % 2) for i in range(len(completions))]

    monkeypatch.setattr(rl_mod, "reward_function", alternating)
    settings = sum((["--set", s] for s in [*QUICK, "rl.save_steps=1"]), [])
    res = runner.invoke(app, ["rl", str(run), *settings])
    assert res.exit_code == 0, res.output
    unbroken = load_file(run / "rl" / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(run / "rl" / "adapter")
    shutil.rmtree(run / "rl" / "checkpoints" / "checkpoint-2")
    res = runner.invoke(app, ["rl", str(run), *settings, "--resume"])
    assert res.exit_code == 0, res.output
    assert "resuming GRPO from" in res.output and "(step 1)" in res.output
    assert "rl step 2 |" in res.output and "rl step 1 |" not in res.output  # only the lost step was done again
    resumed = load_file(run / "rl" / "adapter" / "adapter_model.safetensors")
    assert unbroken.keys() == resumed.keys() and all((unbroken[k] == resumed[k]).all() for k in unbroken)
    lines = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]  # step 2's line written once, by the resumed run
    assert json.loads((run / "rl" / "rl_summary.json").read_text())["resumed_from"] == "rl/checkpoints/checkpoint-1"
