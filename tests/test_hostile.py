"""Issue 21, the hostile sweep's second part: each case as the sweep ran it, now one clear error (or the
right result) and nothing lost. The CLI helpers are tests/test_cli_sweep.py's: a non-zero exit, no
traceback, one ``error:`` line naming the input, and no file that existed before changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_cli_sweep import assert_clear_error, cli, snapshot

# ---------------------------------------------------------------------------------------
# M1, M2: recipe files read the numbers people write, and refuse a key given twice


def _recipe_file(work, body: str):
    path = work / "mine.yaml"
    path.write_text("name: mine\nmodel: {name_or_path: builtin:tiny-phi3}\ndata: {source: starter}\n" + body)
    return path


@pytest.mark.parametrize("written,value", [("2e-4", 2e-4), ("1E-3", 1e-3), ("3.0e-5", 3e-5), ("5e+1", 50.0)])
def test_a_recipe_file_reads_scientific_numbers(work, written, value):
    from codetune.recipe import load_recipe

    path = _recipe_file(work, f"training:\n  learning_rate: {written}\n  epochs: 1\n" if value < 1 else
                        f"training:\n  epochs: {written}\n")  # fmt: skip
    recipe = load_recipe(path)
    got = recipe.training.learning_rate if value < 1 else recipe.training.epochs
    assert got == value
    code, output = cli("recipe", "show", path)
    assert code == 0, output


def test_a_recipe_file_with_a_key_given_twice_is_refused(work):
    path = _recipe_file(work, "training:\n  epochs: 1\ntraining:\n  epochs: 2\n")
    line = assert_clear_error(*cli("recipe", "show", path), str(path), "training", "line 6")
    assert "twice" in line or "duplicate" in line
    nested = _recipe_file(work, "training:\n  epochs: 1\n  epochs: 2\n")
    assert_clear_error(*cli("recipe", "show", nested), "epochs", "line 6")


def test_yaml_merge_keys_still_override(work):
    from codetune.recipe import yaml_load

    assert yaml_load("base: &b {a: 1, b: 2}\nmine:\n  <<: *b\n  b: 3\n")["mine"] == {"a": 1, "b": 3}
    assert yaml_load("x: 12\ny: 0.5\nz: 1e3\nw: .inf\n") == {"x": 12, "y": 0.5, "z": 1000.0, "w": float("inf")}


# ---------------------------------------------------------------------------------------
# T1, T2: text that is not UTF-8 (a byte like \xff on the command line arrives as a lone surrogate)

BAD_BYTE = b"\xff".decode("utf-8", "surrogateescape")  # what Python makes of argv's \xff


def test_generate_prompt_that_is_not_utf8(work, tiny_dir):
    before = snapshot(work)
    assert_clear_error(*cli("generate", tiny_dir, "--recipe", "tiny-cpu", "--prompt", f"abc{BAD_BYTE}"), "--prompt")
    assert snapshot(work) == before


def test_a_recipe_setting_that_is_not_utf8_is_refused_before_prepare(work):
    code, output = cli("prepare", "tiny-cpu", "--run-dir", work / "run", "--set", f"description={BAD_BYTE}")
    assert_clear_error(code, output, "description", "UTF-8")
    assert not (work / "run").exists()


def test_the_card_of_a_run_whose_recipe_holds_a_lone_surrogate(trained_run, work):
    """A recipe.yaml written before the check (YAML keeps the surrogate as an escape): one error naming it."""
    import yaml

    recipe = trained_run / "recipe.yaml"
    raw = yaml.safe_load(recipe.read_text())
    raw["description"] = f"caf{BAD_BYTE}"
    recipe.write_text(yaml.safe_dump(raw))  # ASCII, with the surrogate as an escape
    before = snapshot(work)
    assert_clear_error(*cli("card", trained_run), str(recipe), "description")
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------
# M6: a named pipe, a device or a folder given as a file is "not a regular file", never read


@pytest.fixture
def no_hang():
    """A read of a named pipe would wait forever: fail the test instead."""
    import signal

    def hung(signum, frame):
        raise TimeoutError("the command blocked reading its input")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _not_a_file(work, kind: str, suffix: str):
    import os
    from pathlib import Path

    if kind == "device":
        return Path("/dev/zero")
    path = work.parent / "inputs" / f"input{suffix}"  # beside work/: snapshot() would block on a pipe
    path.parent.mkdir(exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
@pytest.mark.parametrize("command", ["generate --file", "eval --completions", "data.source", "recipe show"])
def test_an_input_that_is_not_a_regular_file(work, tiny_dir, no_hang, kind, command):
    suffix = ".yaml" if command == "recipe show" else ".jsonl"
    path = _not_a_file(work, kind, suffix)
    args = {
        "generate --file": ["generate", tiny_dir, "--recipe", "tiny-cpu", "--file", path],
        "eval --completions": ["eval", "--completions", path, "--suite", "humaneval"],
        "data.source": ["prepare", "tiny-cpu", "--run-dir", work / "run", "--set", f"data.source={path}"],
        "recipe show": ["recipe", "show", path],
    }[command]
    before = snapshot(work)
    assert_clear_error(*cli(*args), str(path), "not a regular file")
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------
# M8: --resume with --overwrite contradict each other


@pytest.mark.parametrize("command", ["train", "run"])
def test_resume_and_overwrite_together_on_the_command_line(trained_run, work, command):
    before = snapshot(work)
    code, output = cli(command, "tiny-cpu", "--run-dir", trained_run, "--resume", "--overwrite")
    assert_clear_error(code, output, "--resume", "--overwrite")
    assert snapshot(work) == before
    assert_clear_error(*cli(command, "tiny-cpu", "--run-dir", work / "new", "--resume", "--overwrite"), "--resume")
    assert not (work / "new").exists()


# ---------------------------------------------------------------------------------------
# M10: generation settings in a --file row are refused, not silently ignored


@pytest.mark.parametrize("field", ["max_tokens", "temperature", "max_new_tokens"])
def test_generate_file_rows_with_generation_settings(work, tiny_dir, field):
    prompts = work / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n' + json.dumps({"prompt": "short, please", field: 5}) + "\n")
    before = snapshot(work)
    code, output = cli("generate", tiny_dir, "--recipe", "tiny-cpu", "--file", prompts)
    line = assert_clear_error(code, output, str(prompts), "row 2", field)
    assert "--set generation." in line
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------
# M11: --completions with uneven samples per task says so


def test_completions_with_uneven_samples_per_task_report_the_real_counts(work):
    from .test_cli_sweep import _canonical

    rows = [
        {"task_id": "HumanEval/0", "completion": _canonical("HumanEval/0")},
        {"task_id": "HumanEval/0", "completion": "    return None\n"},
        {"task_id": "HumanEval/1", "completion": _canonical("HumanEval/1")},
    ]
    path = work / "uneven.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, output = cli("eval", "--completions", path, "--suite", "humaneval", "--out", work / "scores")
    assert code == 0, output
    result = json.loads((work / "scores/summary.json").read_text())["results"]["completions"]["humaneval"]
    assert result["n_per_task"] == {"min": 1, "max": 2}
    assert result["samples"] == 3 and result["pass@1"] == 75.0  # each task's own n: (1/2 + 1/1) / 2


# ---------------------------------------------------------------------------------------
# S3: the card's repo id is the hub's, and everything the card embeds is quoted

INJECTED = 'a/b")\nimport os; os.system("id")  #'


@pytest.mark.parametrize("repo_id", [INJECTED, "not a repo", "a/b/c", "no-owner", "a/" + "b" * 100])
@pytest.mark.parametrize("command", ["card", "push"])
def test_a_repo_id_the_hub_would_refuse(trained_run, work, repo_id, command):
    before = snapshot(work)
    assert_clear_error(*cli(command, trained_run, "--repo-id", repo_id), "--repo-id")
    assert snapshot(work) == before


def test_the_usage_snippet_quotes_the_model_id():
    import ast

    from codetune.card import usage_snippet

    model_id = '/home/x/we"ird\\path\nimport os  #'
    code = usage_snippet(model_id, [1, 2], "Write 'is_prime'.").split("\n", 1)[1].rsplit("```", 1)[0]
    tree = ast.parse(code)
    assigned = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "model_id")
    assert assigned.value.value == model_id
    assert not any(isinstance(n, ast.Import) and n.names[0].name == "os" for n in tree.body)


def test_card_markdown_quotes_what_it_embeds():
    from codetune.card import _code, _fence, _intro_section, _recipe_section
    from codetune.recipe import load_recipe

    assert _code("a`b") == "`` a`b ``" and _code("plain") == "`plain`"
    assert _fence("x\n```\ny", "text").startswith("````text\n") and _fence("x\n```\ny", "text").endswith("\n````")
    recipe = load_recipe("tiny-cpu", ["data.source=we`ird|name.jsonl"])
    recipe.model.name_or_path = "./my **model**\n# x"
    rows = [r for r in _recipe_section(recipe) if r.startswith("| `data.source`")]
    assert rows == ["| `data.source` | `` we`ird\\|name.jsonl `` |"]
    intro = "\n".join(_intro_section("tiny", recipe))
    assert "**./my" not in intro and "\n# x" not in intro and "`./my **model**\\n# x`" in intro


# ---------------------------------------------------------------------------------------
# D5: a folder that looks like a run but has no ownership marker is not codetune's to delete


@pytest.mark.parametrize("command", ["prepare", "train", "run"])
def test_a_run_lookalike_without_the_marker_is_never_cleared(trained_run, work, command):
    (trained_run / ".codetune.json").unlink()
    (trained_run / "checkpoints" / "model.pt").write_bytes(b"someone's weights")
    before = snapshot(work)
    quick = ["training.max_steps=1", "training.save_strategy=no", "evaluation.suites=[rouge]",
             "evaluation.samples=1", "evaluation.compare_base=false", "generation.max_new_tokens=2"]  # fmt: skip
    sets = [arg for s in quick for arg in ("--set", s)]
    code, output = cli(command, "tiny-cpu", "--run-dir", trained_run, "--overwrite", *sets)
    assert_clear_error(code, output, str(trained_run), ".codetune.json")
    assert snapshot(work) == before


def test_outputs_from_before_markers_count_as_ours_only_inside_a_marked_run(tmp_path):
    from codetune.rundir import RunDir, marker_text, ours_or_legacy

    ours = ours_or_legacy("eval", "summary.json")
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "data").mkdir()
    (run / "recipe.yaml").write_text("name: x\n")
    (run / "data" / "stats.json").write_text("{}")
    (run / "eval" / "summary.json").write_text("{}")
    assert not RunDir(run).is_run and not ours(run / "eval")
    (run / ".codetune.json").write_text(marker_text("run"))
    assert RunDir(run).is_run and ours(run / "eval")


# ---------------------------------------------------------------------------------------
# D8: data/ and the recipe that made it change together


def _prepare(run, source, *settings):
    from codetune.prepare import prepare
    from codetune.recipe import load_recipe

    recipe = load_recipe("tiny-cpu", [f"data.source={source}", "data.decontaminate=[]", *settings])
    prepare(recipe, run, log=lambda *a: None)
    return recipe


def test_data_swapped_in_without_its_recipe_is_not_used(tmp_path, tiny_dir):
    """As if prepare --overwrite --set data.split.seed=7 were killed right after data/ moved into place:
    the new data/ sits beside the old recipe.yaml (seed 1234), and train must not take them as a pair."""
    import shutil

    from codetune.recipe import load_recipe
    from codetune.rundir import RunDir
    from codetune.train import data_matches

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"Task {i}", "output": f"x = {i}"}) + "\n" for i in range(30)))
    run, other = RunDir(tmp_path / "run"), RunDir(tmp_path / "other")
    _prepare(run.path, source)
    _prepare(other.path, source, "data.split.seed=7")
    saved = load_recipe(run.recipe_file)
    assert data_matches(saved, run.path)
    shutil.rmtree(run.data)
    shutil.move(other.data, run.data)
    assert load_recipe(run.recipe_file).data.split.seed == 1234
    assert not data_matches(saved, run.path)
    from codetune.recipe import data_fingerprint
    from codetune.rundir import read_marker

    assert read_marker(run.data)["recipe_sha256"] == data_fingerprint(load_recipe(other.recipe_file))


# ---------------------------------------------------------------------------------------
# D7: SIGTERM cleans up as SIGINT does, and staging folders of dead processes are swept

SLOW_EVAL = (
    "import sys, time, codetune.evaluate as e\n"
    "def slow(path, suite, recipe, staging, console):\n"
    "    (staging / 'partial.jsonl').write_text('half a result')\n"
    "    time.sleep(300)\n"
    "e._score_completions = slow\n"
    "from codetune.cli import main\n"
    "main()\n"
)


def test_sigterm_during_eval_leaves_no_staging_folder(work):
    import os
    import signal
    import subprocess
    import sys
    import time

    from .test_cli_sweep import SRC

    completions = work / "c.jsonl"
    completions.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return 1\n"}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    args = ["eval", "--completions", completions, "--suite", "humaneval", "--out", work / "scores"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EVAL, *map(str, args)], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(work.glob(".scores.*.staging/partial.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0].decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 143, output
    assert_clear_error(proc.returncode, output, "terminated")
    assert sorted(p.name for p in work.iterdir()) == ["c.jsonl"]


def _die_while_staging(target) -> None:
    """A process that dies (as SIGKILL would leave it) while its staging folder for ``target`` exists."""
    import os

    from codetune.rundir import staged_dir

    pid = os.fork()
    if pid == 0:
        with staged_dir(target, "eval") as staging:
            (staging / "half").write_text("x")
            os._exit(0)  # no cleanup runs
    os.waitpid(pid, 0)


def test_staged_writes_sweep_staging_folders_of_dead_processes(tmp_path):
    import os

    from codetune.rundir import staged_dir

    _die_while_staging(tmp_path / "merged")
    (stale,) = [p.name for p in tmp_path.iterdir()]
    assert stale.startswith(".merged.pid") and stale.endswith(".staging") and f".pid{os.getpid()}-" not in stale
    _die_while_staging(tmp_path / "eval")  # its staging swept the dead one's first
    (stale,) = [p.name for p in tmp_path.iterdir()]
    assert stale.startswith(".eval.pid")
    mine = tmp_path / ".other.staging"  # not codetune's naming: never touched
    mine.mkdir()
    with staged_dir(tmp_path / "eval", "eval") as staging:
        alive = [p.name for p in tmp_path.iterdir() if p.name.endswith(".staging") and p != staging]
        assert alive == [".other.staging"]  # the dead ones went, the one of this (live) process stays
        (staging / "summary.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.staging", "eval"]


# ---------------------------------------------------------------------------------------
# A real run, trained a few steps, for the cases that load its adapter (copied before any change)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_dir):
    from codetune.pipeline import train

    run = tmp_path_factory.mktemp("short-run") / "run"
    train("tiny-cpu", run, overrides=["training.max_steps=2", "training.eval_steps=null", "training.save_strategy=no"])
    return run


@pytest.fixture
def run_copy(short_run, work):
    import shutil

    run = work / "run"
    shutil.copytree(short_run, run)
    return run


# ---------------------------------------------------------------------------------------
# T3, M9: a write that fails (a full disk; here a file size limit) is one error naming what was written


def cli_limited(*args, cwd, limit: int):
    """The CLI in a subprocess that may write no file larger than ``limit`` bytes (EFBIG, as ENOSPC would)."""
    import os
    import subprocess
    import sys

    from .test_cli_sweep import SRC

    code = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n"  # the sandbox sets its own
        "from codetune.cli import main\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                         timeout=600)  # fmt: skip
    return res.returncode, (res.stdout + res.stderr).decode("utf-8", "replace")


@pytest.mark.parametrize("command", ["merge", "export"])
def test_a_full_disk_during_merge_or_export(run_copy, work, command):
    before = snapshot(work)
    args = ["merge", run_copy] if command == "merge" else ["export", run_copy, "--format", "gguf"]
    code, output = cli_limited(*args, cwd=work, limit=64 * 1024)
    line = assert_clear_error(code, output, str(run_copy / "merged"), "File too large")
    assert "nothing was replaced" in line
    assert snapshot(work) == before  # no staging folder left


def test_a_full_disk_during_eval_completions(work):
    completions = work / "c.jsonl"
    answer = "    return 1\n" + "    # padding\n" * 5000  # 70 kB: the sandbox's program fits, the results row not
    completions.write_text(json.dumps({"task_id": "HumanEval/0", "completion": answer}) + "\n")
    before = snapshot(work)
    args = ["eval", "--completions", completions, "--suite", "humaneval", "--out", work / "scores"]
    code, output = cli_limited(*args, cwd=work, limit=100 * 1024)
    assert_clear_error(code, output, str(work / "scores"), "File too large")
    assert snapshot(work) == before


def test_a_full_disk_during_prepare(work):
    code, output = cli_limited("prepare", "tiny-cpu", "--run-dir", work / "run", cwd=work, limit=8 * 1024)
    assert_clear_error(code, output, str(work / "run" / "data"), "File too large")
    assert sorted(p.name for p in (work / "run").iterdir()) == [".codetune.json"]  # the marker, made first


# ---------------------------------------------------------------------------------------
# T5: a damaged adapter is one error naming the file, for every command that loads it

DAMAGES = {
    "truncated weights": ("adapter_model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000])),
    "empty weights": ("adapter_model.safetensors", lambda p: p.write_bytes(b"")),
    "config not JSON": ("adapter_config.json", lambda p: p.write_text('{"r": 64,')),
    "config a list": ("adapter_config.json", lambda p: p.write_text("[]")),
    "config r a string": ("adapter_config.json", lambda p: p.write_text(p.read_text().replace('"r": 64', '"r": "x"'))),
    "targets the model lacks": (
        "adapter_config.json",
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "target_modules": ["no_such_proj"]})),
    ),
}
COMMANDS = {
    "generate": lambda run: ["generate", run, "--prompt", "hi", "--set", "generation.max_new_tokens=2"],
    "merge": lambda run: ["merge", run],
    "eval": lambda run: ["eval", run, "--suite", "rouge", "--set", "evaluation.samples=1", "--no-compare-base"],
    "card": lambda run: ["card", run],
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_damaged_adapter(run_copy, work, damage, command):
    if command == "card" and damage == "targets the model lacks":
        pytest.skip("the card reads the adapter's files, it never loads the model")
    name, spoil = DAMAGES[damage]
    spoil(run_copy / "adapter" / name)
    if damage == "config r a string":
        assert '"r": "x"' in (run_copy / "adapter" / name).read_text()
    before = snapshot(work)
    code, output = cli(*COMMANDS[command](run_copy))
    named = name if damage != "targets the model lacks" else "adapter"
    assert_clear_error(code, output, str(run_copy / "adapter"), named)
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------
# D4: results belong to a model's content (adapter, base, suite), not to where its folder sits

QUICK_EVAL = ["--set", "evaluation.samples=2", "--set", "generation.max_new_tokens=4"]


def _fake_generation(monkeypatch):
    """eval without the model: each suite scored from a canned answer (the rest of eval runs as it is)."""
    import codetune.evaluate as ev

    def fake(src, suites, recipe, staging, compare_base, console, batch_size, merged):
        results = {}
        for suite in suites:
            tasks = ev.load_tasks(suite, recipe, src.folder)[:2]
            results[suite] = ev.score_suite(suite, tasks, [["x = 1"]] * len(tasks), recipe, staging, None, [1])
        return {"source": src.name, "recipe": recipe.name, "suites": list(suites), "results": {"fine-tuned": results},
                "model": ev._evaluated(recipe, src, merged), "generation": {}}  # fmt: skip

    monkeypatch.setattr(ev, "_evaluate", fake)


def test_a_moved_run_keeps_its_results(run_copy, work, monkeypatch):
    import shutil

    code, output = cli("eval", run_copy, "--suite", "rouge", "--compare-base", *QUICK_EVAL)
    assert code == 0, output
    assert (run_copy / "eval" / "base" / "rouge.jsonl").is_file()
    moved = work / "moved"
    shutil.move(run_copy, moved)
    before = snapshot(work)
    # the same adapter's rouge results are still its own: scoring them again needs --overwrite
    assert_clear_error(*cli("eval", moved, "--suite", "rouge", *QUICK_EVAL), "already has results for rouge")
    assert snapshot(work) == before
    _fake_generation(monkeypatch)
    code, output = cli("eval", moved, "--suite", "starter-novel", "--no-compare-base", *QUICK_EVAL)
    assert code == 0, output
    assert "dropping" not in output
    summary = json.loads((moved / "eval" / "summary.json").read_text())
    assert summary["suites"] == ["rouge", "starter-novel"]
    assert set(summary["results"]["fine-tuned"]) == {"rouge", "starter-novel"} and "rouge" in summary["results"]["base"]
    assert (moved / "eval" / "base" / "rouge.jsonl").is_file() and (moved / "eval" / "rouge.jsonl").is_file()
    assert str(work) not in json.dumps({k: v for k, v in summary.items() if k != "source"})


def test_another_adapter_in_the_same_folder_drops_the_results(run_copy, work, monkeypatch):
    from safetensors.numpy import load_file, save_file

    _fake_generation(monkeypatch)
    assert cli("eval", run_copy, "--suite", "rouge", *QUICK_EVAL)[0] == 0
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, weights)  # as if trained again
    code, output = cli("eval", run_copy, "--suite", "starter-novel", *QUICK_EVAL)
    assert code == 0, output
    assert "dropping the earlier results for rouge" in output
    assert set(json.loads((run_copy / "eval" / "summary.json").read_text())["results"]["fine-tuned"]) == {
        "starter-novel"
    }


# ---------------------------------------------------------------------------------------
# D6, S1: a run's eval/ holds only what its own adapter scored, and only that reaches its card


def _canonical_file(path, count=3):
    from codetune.suites import load_humaneval

    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in load_humaneval()[:count]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("existing", [False, True])
def test_completions_never_write_into_a_runs_eval(trained_run, work, existing):
    canonical = _canonical_file(work / "canonical.jsonl")
    if existing:
        (trained_run / "eval").mkdir()
        (trained_run / "eval" / ".codetune.json").write_text('{"kind": "eval", "version": 1}\n')
        (trained_run / "eval" / "summary.json").write_text('{"suites": [], "results": {}}\n')
    before = snapshot(work)
    for out in (trained_run / "eval", trained_run / "eval" / "sub"):
        for extra in ([], ["--overwrite"]):
            code, output = cli("eval", "--completions", canonical, "--suite", "humaneval", "--out", out, *extra)
            assert_clear_error(code, output, str(out), str(trained_run))
    assert snapshot(work) == before


def test_another_model_never_writes_into_a_runs_eval(trained_run, work, tiny_dir):
    before = snapshot(work)
    code, output = cli("eval", tiny_dir, "--recipe", "tiny-cpu", "--suite", "rouge", "--out", trained_run / "eval")
    assert_clear_error(code, output, str(trained_run / "eval"))
    assert snapshot(work) == before


def test_the_card_never_shows_scores_of_completions(run_copy, work):
    import shutil

    canonical = _canonical_file(work / "canonical.jsonl", 164)
    code, output = cli("eval", "--completions", canonical, "--suite", "humaneval", "--out", work / "scores")
    assert code == 0, output
    shutil.copytree(work / "scores", run_copy / "eval")  # as an earlier codetune let it write there
    assert_clear_error(*cli("card", run_copy), str(run_copy / "eval" / "summary.json"))
    assert not (run_copy / "README.md").exists()


def test_the_card_carries_only_the_adapters_own_results(run_copy, work, monkeypatch):
    import yaml

    from codetune.rundir import RunDir

    _fake_generation(monkeypatch)
    assert cli("eval", run_copy, "--suite", "rouge", *QUICK_EVAL)[0] == 0
    path = run_copy / "eval" / "summary.json"
    summary = json.loads(path.read_text())
    sha = RunDir(run_copy).adapter_fingerprint()
    planted = {"tasks": 164, "tasks_in_suite": 164, "partial": False, "pass@1": 100.0, "parse_rate": 100.0}
    summary["results"]["completions"] = {"humaneval": planted}  # no adapter: not this run's
    summary["results"]["fine-tuned"]["mbpp"] = {**planted, "tasks_in_suite": 500, "adapter_sha256": "0" * 64}
    summary["results"]["model"] = {"humaneval": {**planted, "adapter_sha256": sha}}  # not the run's adapter + base
    summary["suites"] += ["humaneval", "mbpp"]
    path.write_text(json.dumps(summary))
    code, output = cli("card", run_copy)
    assert code == 0, output
    card = (run_copy / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    metrics = {m["type"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    assert metrics == {"rouge"}
    evaluation = card.split("## Evaluation", 1)[1].split("## Chat format", 1)[0]
    assert "rougeL" in evaluation and "100.0" not in card
    assert "humaneval" not in evaluation and "mbpp" not in evaluation and "completions" not in evaluation


# ---------------------------------------------------------------------------------------
# D1, D2, M5, M9 (report): `codetune report` writes as `card` does: an existing file is replaced only with
# --overwrite and only when it is a report codetune wrote; a folder is no report file; a full disk is named


@pytest.mark.parametrize("target", ["adapter/adapter_model.safetensors", "recipe.yaml", "metrics.jsonl"])
@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_report_never_writes_over_a_file_it_did_not_write(trained_run, work, target, extra):
    before = snapshot(work)
    code, output = cli("report", trained_run, "--out", trained_run / target, *extra)
    line = assert_clear_error(code, output, str(trained_run / target))
    assert code == 2
    assert ("not a codetune report" in line) if extra else ("--overwrite" in line)
    assert snapshot(work) == before


def test_report_keeps_a_users_own_report_html(trained_run, work):
    mine = trained_run / "report.html"
    mine.write_text("<html><body>my own notes</body></html>\n")
    before = snapshot(work)
    for extra, says in (([], "pass --overwrite"), (["--overwrite"], "not a codetune report")):
        code, output = cli("report", trained_run, *extra)
        line = assert_clear_error(code, output, str(mine), says)
        assert code == 2, line
    assert snapshot(work) == before


def test_report_replaces_its_own_report_only_with_overwrite(trained_run, work):
    report = trained_run / "report.html"
    assert cli("report", trained_run)[0] == 0
    before = snapshot(work)
    code, output = cli("report", trained_run)  # as `card` does: its own earlier output too, only when asked
    assert_clear_error(code, output, str(report), "--overwrite")
    assert snapshot(work) == before
    code, output = cli("report", trained_run, "--overwrite")
    assert code == 0, output
    assert "codetune report" in report.read_text()


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_report_out_an_existing_folder(trained_run, work, extra):
    folder = work / "reports"
    folder.mkdir()
    before = snapshot(work)
    code, output = cli("report", trained_run, "--out", folder, *extra)
    line = assert_clear_error(code, output, str(folder), "is a folder")
    assert code == 2 and ".tmp" not in line
    assert snapshot(work) == before


def test_a_full_disk_while_writing_the_report(trained_run, work):
    before = snapshot(work)
    code, output = cli_limited("report", trained_run, cwd=work, limit=4 * 1024)
    line = assert_clear_error(code, output, str(trained_run / "report.html"), "File too large")
    assert code == 2 and "nothing was replaced" in line
    assert snapshot(work) == before  # no staging folder, no temporary file left


# ---------------------------------------------------------------------------------------
# T4, H1: a damaged run file (eval/summary.json, train_summary.json, a metrics.jsonl line) is one error naming
# it, in the report, the card and the page at `codetune serve`'s GET /; never a traceback or a 500


def _summary(**suites) -> dict:
    rouge = {"samples": 2, "rouge1": 20.0, "rouge2": 2.0, "rougeL": 12.5, "rougeLsum": 20.0, "parse_rate": 50.0}
    executed = {"tasks": 5, "tasks_in_suite": 164, "partial": True, "samples": 5, "n_per_task": 1,
                "sandbox": "processes", "pass@1": 40.0, "parse_rate": 100.0}  # fmt: skip
    tuned = {"rouge": {**rouge, **suites.get("rouge", {})}, "humaneval": {**executed, **suites.get("humaneval", {})}}
    return {"source": "run", "suites": ["rouge", "humaneval"], "results": {"fine-tuned": tuned}}


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


RUN_FILE_DAMAGES = {
    "summary nested 100k deep": ("eval/summary.json", _deep(100_000)),
    "summary nested 100 deep": ("eval/summary.json", json.dumps({"results": json.loads(_deep(100))})),
    "rouge1 a string": ("eval/summary.json", json.dumps(_summary(rouge={"rouge1": "high"}))),
    "pass@1 null": ("eval/summary.json", json.dumps(_summary(humaneval={"pass@1": None}))),
    "results a string": ("eval/summary.json", json.dumps({**_summary(), "results": "x"})),
    "summary not UTF-8": ("eval/summary.json", b'{"results": {"\xff\xfe": {}}}'),
    "train summary nested deep": ("train_summary.json", '{"a": ' * 100_000 + "1" + "}" * 100_000),
    "train summary steps a string": ("train_summary.json", json.dumps({"global_step": "many", "tokens": 10})),
    "metrics step 1e999": ("metrics.jsonl", '{"step": 1, "train_loss": 2.0}\n{"step": 1e999, "train_loss": 1.0}\n'),
    "metrics loss a list": ("metrics.jsonl", '{"step": 1, "train_loss": [2.0]}\n'),
}


def _damage(run, name: str) -> Path:
    relative, content = RUN_FILE_DAMAGES[name]
    path = run / relative
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _served_root(run) -> tuple[int, str]:
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from codetune.serve import create_app

    engine = SimpleNamespace(name="stub", source=str(run))  # GET / reads the run, never the model
    with TestClient(create_app(engine), raise_server_exceptions=False) as client:
        res = client.get("/")
    return res.status_code, res.text


@pytest.mark.parametrize("damage", list(RUN_FILE_DAMAGES))
@pytest.mark.parametrize("command", ["report", "card", "serve"])
def test_a_damaged_run_file(trained_run, work, damage, command):
    import html

    path = _damage(trained_run, damage)
    if command == "card" and path.name == "metrics.jsonl":
        pytest.skip("the card reads the loss table training wrote, not metrics.jsonl")
    if command == "serve":
        status, text = _served_root(trained_run)
        assert status == 200 and "No run report" in text
        assert html.escape(str(path)) in text
        return
    before = snapshot(work)
    code, output = cli(command, trained_run)
    assert code == 2
    assert_clear_error(code, output, str(path))
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------
# T4, H1 fuzzed: whatever lands in a trained run's eval/summary.json, train_summary.json or a metrics.jsonl
# line (deep nesting, wrong types, huge numbers, null, text, bytes that are not UTF-8), the report, the card
# and GET / give their page or one CodetuneError: never another exception, a traceback or a 5xx

_SCALARS = st.none() | st.booleans() | st.integers(-(10**40), 10**40) | st.floats() | st.text(max_size=12)
_JSON = st.recursive(
    _SCALARS,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=10,
)
_RAW = st.one_of(
    st.binary(max_size=40),
    st.integers(1, 200_000).map(lambda d: ("[" * d + "]" * d).encode()),
    st.integers(1, 200_000).map(lambda d: ('{"results": ' * d + "{}" + "}" * d).encode()),
    st.sampled_from([b"1e999", b"-1e999", b"NaN", b"1" * 5000, b"\xff\xfe{}", b"", b"null", b'"x"', b"{" * 3]),
)
_FIELDS = {
    "eval/summary.json": [
        (), ("results",), ("suites",), ("adapter_sha256",), ("results", "fine-tuned"), ("results", "base"),
        ("results", "fine-tuned", "rouge"), ("results", "fine-tuned", "rouge", "rouge1"),
        ("results", "fine-tuned", "rouge", "samples"), ("results", "base", "rouge", "rougeL"),
        ("results", "fine-tuned", "rouge", "adapter_sha256"), ("results", "fine-tuned", "humaneval", "pass@1"),
        ("results", "fine-tuned", "humaneval", "n_per_task"), ("results", "fine-tuned", "humaneval", "tasks"),
        ("results", "fine-tuned", "humaneval", "partial"), ("results", "fine-tuned", "humaneval", "sandbox"),
        ("results", "fine-tuned", "humaneval", "parse_rate"),
    ],
    "train_summary.json": [(), ("global_step",), ("epochs",), ("tokens",), ("trainable_parameters",),
                           ("total_parameters",), ("device",), ("world_size",), ("wall_s_this_session",)],
    "metrics.jsonl": [(), ("step",), ("train_loss",), ("eval_loss",), ("learning_rate",)],
}  # fmt: skip


@st.composite
def _run_file_damage(draw) -> tuple[str, tuple | None, object]:
    name = draw(st.sampled_from(list(_FIELDS)))
    if draw(st.integers(0, 3)) == 0:
        return name, None, draw(_RAW)
    return name, draw(st.sampled_from(_FIELDS[name])), draw(_JSON)


def _good_files(run) -> dict[str, object]:
    from codetune.rundir import RunDir

    summary = _summary()
    summary["results"]["base"] = json.loads(json.dumps(summary["results"]["fine-tuned"]))
    summary["adapter_sha256"] = sha = RunDir(run).adapter_fingerprint()
    for suite in summary["results"]["fine-tuned"].values():
        suite["adapter_sha256"] = sha
    train = json.loads((run / "train_summary.json").read_text())
    line = {"step": 2, "epoch": 0.1, "train_loss": 3.5, "eval_loss": 3.9, "learning_rate": 1e-4, "tokens": 10}
    return {"eval/summary.json": summary, "train_summary.json": train, "metrics.jsonl": line}


def _set(obj, path: tuple, value):
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    inner = obj
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = value
    return obj


def _write_damaged(run, good: dict, name: str, path: tuple | None, value) -> None:
    first = json.dumps({"step": 1, "train_loss": 4.0}) + "\n"  # metrics.jsonl: a sound line, then the one drawn
    for each, content in good.items():  # the other files as codetune writes them
        (run / each).write_text((first if each == "metrics.jsonl" else "") + json.dumps(content) + "\n")
    data = value if path is None else json.dumps(_set(good[name], path, value), allow_nan=True).encode()
    if name == "metrics.jsonl":
        data = first.encode() + data + b"\n"
    (run / name).write_bytes(data)


def test_damaged_run_files_fuzzed(run_copy, work):
    from codetune.card import render_card
    from codetune.errors import CodetuneError

    (run_copy / "eval").mkdir()
    good = _good_files(run_copy)
    _write_damaged(run_copy, good, "metrics.jsonl", (), good["metrics.jsonl"])
    assert cli("report", run_copy, "--out", work / "r.html")[0] == 0  # the skeleton itself is sound
    assert "## Evaluation" in render_card(run_copy) and "rougeL" in render_card(run_copy)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_run_file_damage())
    def holds(damage):
        _write_damaged(run_copy, good, *damage)
        code, output = cli("report", run_copy, "--out", work / "r.html", "--overwrite")
        assert code in (0, 2) and "Traceback" not in output, output
        try:
            render_card(run_copy)
        except CodetuneError:
            pass
        status, text = _served_root(run_copy)
        assert status == 200, text

    holds()


@pytest.mark.parametrize("pattern", [{"q_proj": "x"}, {"q_proj": 0}, "x"])
def test_serve_vllm_reads_the_adapter_config_through_the_loader(tmp_path, work, pattern):
    from .test_serve import _phi3_run

    run = _phi3_run(tmp_path, r=8)
    config = run / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": pattern}))
    before = snapshot(tmp_path)
    code, output = cli("serve", run, "--engine", "vllm", "--dry-run")
    assert code == 2
    assert_clear_error(code, output, str(config), "rank_pattern")
    assert snapshot(tmp_path) == before
