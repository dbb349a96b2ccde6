"""The CLI with bad input, as a careless or hostile user would give it (issue 11 and issue 10's attack 1).

Every case runs the real command line and checks four things: a non-zero exit, no traceback, one
``error:`` line that names the input, and that no file that existed before changed (the whole tree
is hashed before and after). Cases that must succeed despite odd input check that their results
were written and that nothing else changed.

Most cases run in this process through the CLI's own entry point (typer's CliRunner calls the same
``main`` the ``codetune`` script does); the few that need real stdin bytes or a different user run
``python -m codetune.cli`` in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import codetune
from codetune.cli import app

SRC = Path(codetune.__file__).resolve().parents[1]  # the subprocesses run the same codetune as this one
runner = CliRunner()


# ---------------------------------------------------------------------------------------
# Helpers


def snapshot(root: Path) -> dict[str, str]:
    """Every file, link and folder under ``root`` with a hash of its content. Iterative and through
    folder descriptors: the trees here are 3,000 folders deep, past Python's recursion limit and PATH_MAX."""
    out: dict[str, str] = {}
    flags = os.O_RDONLY | os.O_NOFOLLOW
    stack = [(os.open(root, flags | os.O_DIRECTORY), "")]
    while stack:
        fd, rel = stack.pop()
        try:
            for entry in os.scandir(fd):
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_symlink():
                    out[name] = "link:" + os.readlink(entry.name, dir_fd=fd)
                elif entry.is_dir():
                    out[name] = "dir"
                    stack.append((os.open(entry.name, flags | os.O_DIRECTORY, dir_fd=fd), name))
                else:
                    with os.fdopen(os.open(entry.name, flags, dir_fd=fd), "rb") as fh:
                        out[name] = hashlib.sha256(fh.read()).hexdigest()
        finally:
            os.close(fd)
    return out


def cli(*args: str, cwd: Path | None = None):
    """Run the CLI in this process; returns (exit code, output)."""
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        res = runner.invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(res.exception))
        return 1, res.output + "\nTraceback (most recent call last):\n" + tb
    return res.exit_code, res.output


def cli_subprocess(*args: str, cwd: Path, stdin: bytes | None = None, timeout=300):
    # PYTHONIOENCODING: stdin strictly UTF-8, as on a UTF-8 terminal (the C locale would smuggle bad bytes in)
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env["PYTHONIOENCODING"] = "utf-8:strict"
    res = subprocess.run(
        [sys.executable, "-m", "codetune.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )
    return res.returncode, (res.stdout + res.stderr).decode("utf-8", "replace")


def assert_clear_error(code: int, output: str, *names: str) -> str:
    """Non-zero exit, no traceback, exactly one error line, and it names each of ``names``."""
    assert code != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


# ---------------------------------------------------------------------------------------
# Data loss: folders codetune writes


@pytest.mark.parametrize("out", ["RUN", "..", "."])
def test_merge_never_targets_the_run_or_the_current_directory(trained_run, work, out):
    target = {"RUN": trained_run, "..": "..", ".": "."}[out]
    before = snapshot(work.parent)
    code, output = cli("merge", trained_run, "--out", target, "--overwrite", cwd=trained_run if out != "RUN" else work)
    assert_clear_error(code, output, "--out", str(target))
    assert snapshot(work.parent) == before


def test_merge_refuses_a_folder_codetune_did_not_make(trained_run, work):
    mine = work / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    before = snapshot(work)
    assert_clear_error(*cli("merge", trained_run, "--out", mine), str(mine), "--overwrite")
    assert_clear_error(*cli("merge", trained_run, "--out", mine, "--overwrite"), str(mine), "not a codetune")
    assert snapshot(work) == before


def test_export_and_card_refuse_files_codetune_did_not_write(trained_run, work):
    notes = work / "notes.gguf"
    notes.write_text("my notes\n")
    (trained_run / "README.md").write_text("# my own notes about this run\n")
    before = snapshot(work)
    assert_clear_error(*cli("export", trained_run, "--out", notes), str(notes))
    assert_clear_error(*cli("export", trained_run, "--out", notes, "--overwrite"), str(notes), "not a codetune")
    assert_clear_error(*cli("card", trained_run, "--overwrite"), "README.md", "not a codetune")
    assert snapshot(work) == before


def test_prepare_leaves_a_trained_run_alone(trained_run, work):
    before = snapshot(work)
    line = assert_clear_error(*cli("prepare", "tiny-cpu", "--run-dir", trained_run), str(trained_run))
    assert "--overwrite" in line and "--resume" not in line  # prepare has no --resume
    assert snapshot(work) == before


def test_errors_suggest_only_options_the_command_has(trained_run, work):
    (trained_run / "README.md").write_text("---\ntags:\n- codetune\n---\n# an earlier card\n")
    before = snapshot(work)
    line = assert_clear_error(*cli("card", trained_run), "README.md", "--overwrite")
    assert "--out" not in line and "new path" not in line  # card writes RUN_DIR/README.md, nowhere else
    line = assert_clear_error(*cli("train", "tiny-cpu", "--run-dir", trained_run), str(trained_run))
    assert "--resume" in line and "--overwrite" in line  # train has both
    assert snapshot(work) == before


def _offline_cli(*args: str, cwd: Path) -> tuple[int, str]:
    """The CLI in a fresh process with the hub off and an empty hub cache (a developer's own cache may
    hold the real tokenizers)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd.parent / "hf"), "COLUMNS": "80"}
    res = subprocess.run(
        [sys.executable, "-m", "codetune.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    return res.returncode, res.stdout + res.stderr


@pytest.mark.parametrize("recipe", ["phi3-mini-python-seed", "phi3-mini-python"])
def test_a_shipped_recipe_offline_says_the_hub_is_needed_and_leaves_nothing(work, recipe):
    before = snapshot(work)
    for cmd in (["prepare", recipe, "--run-dir", "runs/x"], ["train", recipe, "--run-dir", "runs/mine"]):
        code, output = _offline_cli(*cmd, cwd=work)
        line = assert_clear_error(code, output, "microsoft/Phi-3-mini-4k-instruct", "needs the Hugging Face hub")
        assert code == 2 and "--set tokenizer.name_or_path=DIR" in line
        assert "sentencepiece" not in output and len(output.strip().splitlines()) <= 2  # a note, then the error
    assert snapshot(work) == before  # no runs/x, no runs/mine: nothing was done


def test_an_empty_run_folder_is_named_as_one(work):
    empty = work / "runs" / "mine"
    empty.mkdir(parents=True)
    (empty / ".codetune.json").write_text('{"kind": "run", "version": 1}\n')  # left by an older codetune
    before = snapshot(work)
    for cmd in (
        ["eval", "runs/mine", "--suite", "rouge"],
        ["serve", "runs/mine", "--engine", "vllm", "--dry-run"],
        ["generate", "runs/mine", "--prompt", "hi"],
    ):
        assert_clear_error(*cli(*cmd), "runs/mine: a run directory with nothing trained yet")
    assert snapshot(work) == before


@pytest.mark.parametrize(
    "setting",
    [
        "training.optimizer=adamw_tourch",
        "training.lr_scheduler=cosin",
        "training.epochs=.inf",
        "training.report_to=[wandb]",
    ],
)
def test_a_train_that_fails_changes_nothing(trained_run, work, setting):
    """Each fails before the model loads, naming the field, and the run's recipe.yaml stays as it was."""
    if setting.endswith("[wandb]"):
        import importlib.util

        if importlib.util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed here: report_to [wandb] is valid")
    before = snapshot(work)
    field = setting.split("=")[0]
    code, output = cli("train", "tiny-cpu", "--run-dir", trained_run, "--overwrite", "--set", setting)
    assert_clear_error(code, output, field)
    assert snapshot(work) == before


def test_prepare_refuses_a_folder_that_is_not_a_run(work):
    mine = work / "project"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "results.csv").write_text("a,b\n1,2\n")
    before = snapshot(work)
    assert_clear_error(*cli("prepare", "tiny-cpu", "--run-dir", mine), str(mine))
    assert snapshot(work) == before


def test_prepare_skip_invalid_writes_the_lone_surrogate_row_aside(work, codetune_home):
    src = work / "rows.jsonl"
    rows = [json.dumps({"instruction": f"Task {i} about {'xyz' * i}.", "output": f"x = {i}"}) for i in range(30)]
    rows.insert(3, '{"instruction": "bad \\ud800 text", "output": "x"}')
    src.write_text("\n".join(rows) + "\n")
    code, output = cli(
        "prepare", "tiny-cpu", "--run-dir", work / "run", "--set", f"data.source={src}", "--skip-invalid",
        "--set", "data.decontaminate=[]",
    )  # fmt: skip
    assert code == 0, output
    rejected = [json.loads(x) for x in (work / "run/data/rejected.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejected] == [4]
    assert rejected[0]["data"]["instruction"] == "bad \ud800 text"  # kept exactly, as a JSON escape


@pytest.fixture
def read_only_folder(work):
    """An empty folder nobody may write to: mode 0555, or for root (who ignores modes) the immutable
    attribute, where the file system has it."""
    locked = work / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o555)
        yield locked
        locked.chmod(0o755)
        return
    res = subprocess.run(["chattr", "+i", str(locked)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(
            f"running as root and `chattr +i` is not available here ({res.stderr.decode().strip()}): "
            "there is no way to make a folder read-only for root"
        )
    try:
        yield locked
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_a_read_only_run_directory(work, read_only_folder):
    """A run directory the user cannot write: one error line naming it, for prepare, train and eval --out."""
    locked = read_only_folder
    (work / "c.jsonl").write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return 1\n"}) + "\n")
    before = snapshot(work)
    for args in (
        ["prepare", "tiny-cpu", "--run-dir", locked],
        ["train", "tiny-cpu", "--run-dir", locked],
        ["prepare", "tiny-cpu", "--run-dir", locked / "run"],
        ["train", "tiny-cpu", "--run-dir", locked / "run"],
        ["eval", "--completions", work / "c.jsonl", "--suite", "humaneval", "--out", locked / "scores"],
    ):
        assert_clear_error(*cli(*args), str(locked))
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------
# Data loss: eval --completions


HUMANEVAL_0 = "HumanEval/0"


def _canonical(task_id: str) -> str:
    from codetune.suites import load_humaneval

    return next(p["canonical_solution"] for p in load_humaneval() if p["task_id"] == task_id)


def test_eval_completions_keeps_every_result_when_some_samples_are_odd(work):
    """A lone surrogate, a 3,000-deep expression (RecursionError in ast) and a 7,000-deep one (MemoryError):
    each sample gets its own error,
    the others are scored, and the results are written (to runs/eval-<stem>: the input has no suffix)."""
    path = work / "answers"  # no suffix: the output folder once had the input's own name
    rows = [
        {"task_id": HUMANEVAL_0, "completion": _canonical(HUMANEVAL_0)},
        {"task_id": HUMANEVAL_0, "completion": "    return '\ud800'\n"},
        {"task_id": HUMANEVAL_0, "completion": "    return " + "+".join(["1"] * 3000) + "\n"},
        {"task_id": HUMANEVAL_0, "completion": "    return " + "-" * 7000 + "1\n"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(work)
    code, output = cli("eval", "--completions", path, "--suite", "humaneval")
    assert code == 0, output
    assert "Traceback" not in output
    out = work / "runs" / "eval-answers"
    samples = [json.loads(line) for line in (out / "humaneval.jsonl").read_text().splitlines()]
    assert [s["scores"]["passed"] for s in samples] == [True, False, False, False]
    assert samples[1]["completion"] == rows[1]["completion"] and samples[1]["error"]
    summary = json.loads((out / "summary.json").read_text())["results"]["completions"]["humaneval"]
    assert summary["samples"] == 4
    after = {k: v for k, v in snapshot(work).items() if not k.startswith("runs")}
    assert after == before


def test_parse_rate_counts_bare_humaneval_bodies_as_they_run(work):
    """Standard HumanEval completions are bare function bodies: they pass, so they parse."""
    from codetune.suites import load_humaneval

    problems = load_humaneval()[:4]
    path = work / "bodies.jsonl"
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, output = cli("eval", "--completions", path, "--suite", "humaneval", "--out", work / "scores")
    assert code == 0, output
    result = json.loads((work / "scores/summary.json").read_text())["results"]["completions"]["humaneval"]
    assert result["pass@1"] == 100.0
    assert result["parse_rate"] == 100.0


def _plant(folder: Path, victim: Path, depth: int = 3000) -> None:
    """Issue 10's attack: links named like eval's files, pointing at a victim, and a 3,000-deep tree."""
    folder.mkdir()
    for name in (
        "humaneval.jsonl",
        "humaneval.jsonl.tmp",
        "summary.json",
        "summary.md",
        ".codetune.json",
        "base",
    ):
        (folder / name).symlink_to(victim)
    fd = os.open(folder, os.O_RDONLY)
    try:  # relative mkdirs: the full path would pass PATH_MAX
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            new = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = new
    finally:
        os.close(fd)


def _remove_deep(folder: Path) -> None:
    """Take the planted chain down one level at a time (pytest's own cleanup recurses and would crash)."""
    while (folder / "d").is_dir():
        if (folder / "d" / "d").is_dir():
            os.rename(folder / "d" / "d", folder / "up")
            os.rmdir(folder / "d")
            os.rename(folder / "up", folder / "d")
        else:
            os.rmdir(folder / "d")


def test_eval_never_writes_through_a_planted_output_folder(work, request):
    victim = work / "victim.txt"
    victim.write_text("root's file\n")
    shared = work / "shared"  # stands for /tmp
    shared.mkdir()
    shared.chmod(0o1777)
    completions = shared / "x.jsonl"
    completions.write_text(json.dumps({"task_id": HUMANEVAL_0, "completion": "    return 1\n"}) + "\n")
    _plant(shared / "x", victim)
    request.addfinalizer(lambda: _remove_deep(shared / "x"))
    before = snapshot(work)
    # the default output folder is never derived from the input's (shared) location
    code, output = cli("eval", "--completions", completions, "--suite", "humaneval")
    assert code == 0, output
    assert (work / "runs" / "eval-x" / "summary.json").is_file()
    # an explicit --out at the planted folder is refused, with or without --overwrite
    for extra in ([], ["--overwrite"]):
        code, output = cli("eval", "--completions", completions, "--suite", "humaneval", "--out", shared / "x", *extra)
        assert_clear_error(code, output, str(shared / "x"))
    # and a link planted where the output folder goes is refused
    (work / "runs" / "eval-y").symlink_to(shared / "x")
    code, output = cli("eval", "--completions", completions, "--suite", "humaneval", "--out", work / "runs/eval-y")
    assert_clear_error(code, output, "eval-y")
    after = {k: v for k, v in snapshot(work).items() if not k.startswith("runs")}
    assert after == {k: v for k, v in before.items() if not k.startswith("runs")}
    assert victim.read_text() == "root's file\n"


def test_eval_out_replaces_only_its_own_results_and_only_with_overwrite(work):
    completions = work / "c.jsonl"
    completions.write_text(json.dumps({"task_id": HUMANEVAL_0, "completion": _canonical(HUMANEVAL_0)}) + "\n")
    args = ["eval", "--completions", completions, "--suite", "humaneval", "--out", work / "scores"]
    assert cli(*args)[0] == 0
    first = snapshot(work)
    assert_clear_error(*cli(*args), "scores", "--overwrite")
    assert snapshot(work) == first
    code, output = cli(*args, "--overwrite")
    assert code == 0, output
    summary = json.loads((work / "scores/summary.json").read_text())
    assert summary["results"]["completions"]["humaneval"]["pass@1"] == 100


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_eval_completions_path_that_is_not_a_file(work, kind):
    path = work / ("nope.jsonl" if kind == "missing" else "a-folder")
    if kind == "folder":
        path.mkdir()
    before = snapshot(work)
    assert_clear_error(*cli("eval", "--completions", path, "--suite", "humaneval"), str(path))
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------
# Clear errors instead of tracebacks


def test_a_data_row_nested_100k_deep(work):
    src = work / "deep.jsonl"
    src.write_text('{"instruction": ' + "[" * 100_000 + "]" * 100_000 + ', "output": "x"}\n')
    before = snapshot(work)
    code, output = cli("prepare", "tiny-cpu", "--run-dir", work / "run", "--set", f"data.source={src}")
    assert_clear_error(code, output, str(src), "row 1")
    assert {k: v for k, v in snapshot(work).items() if not k.startswith("run")} == before


@pytest.mark.parametrize("rows,test_size", [(1, "0.05"), (4, "4"), (4, "9")])
def test_a_split_that_leaves_nothing_to_train_on(work, rows, test_size):
    src = work / "few.jsonl"
    src.write_text(
        "".join(json.dumps({"instruction": f"Task {i}", "output": f"x = {i}"}) + "\n" for i in range(rows))
    )
    code, output = cli(
        "prepare", "tiny-cpu", "--run-dir", work / "run", "--set", f"data.source={src}",
        "--set", f"data.split.test_size={test_size}", "--set", "data.decontaminate=[]",
    )  # fmt: skip
    assert_clear_error(code, output, str(src), "test_size")
    assert not (work / "run" / "data").exists()


def test_a_latin1_recipe_file(work):
    recipe = work / "mine.yaml"
    text = "name: caf\xe9\nmodel: {name_or_path: builtin:tiny-phi3}\ndata: {source: starter}\n"
    recipe.write_bytes(text.encode("latin-1"))
    assert_clear_error(*cli("recipe", "show", recipe), str(recipe), "UTF-8")


@pytest.mark.parametrize(
    "setting,field",
    [
        ("training.learning_rate=.inf", "training.learning_rate"),
        ("lora.r=100000", "lora.r"),
        ("training.batch_size=true", "training.batch_size"),
        ("name=../../etc", "name"),
        ("generation.seed=18446744073709551616", "generation.seed"),
        ("training.optimizer=adamw_tourch", "training.optimizer"),
        ("training.lr_scheduler=cosin", "training.lr_scheduler"),
    ],
)
def test_recipe_nonsense_is_refused(work, setting, field):
    assert_clear_error(*cli("recipe", "show", "tiny-cpu", "--set", setting), field)


@pytest.mark.parametrize(
    "row,field",
    [
        ("[1, 2]", "(row)"),
        ('{"messages": []}', "messages"),
        ('{"messages": [{"role": "user"}]}', "messages[0].content"),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role"),
        ('{"messages": [1, 2]}', "messages[0]"),
        ('{"prompt": 7}', "prompt"),
    ],
)
def test_generate_file_with_malformed_messages(work, tiny_dir, row, field):
    prompts = work / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n' + row + "\n")
    before = snapshot(work)
    code, output = cli("generate", tiny_dir, "--recipe", "tiny-cpu", "--file", prompts)
    assert_clear_error(code, output, str(prompts), "row 2", field)
    assert snapshot(work) == before


def test_generate_out_does_not_replace_a_file_it_did_not_write(work, tiny_dir):
    prompts = work / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n')
    mine = work / "mine.jsonl"
    mine.write_text('{"important": true}\n')
    before = snapshot(work)
    for extra in ([], ["--overwrite"]):
        code, output = cli("generate", tiny_dir, "--recipe", "tiny-cpu", "--file", prompts, "--out", mine, *extra)
        assert_clear_error(code, output, str(mine))
    assert snapshot(work) == before


def test_port_out_of_range(work):
    assert_clear_error(*cli("serve", "somewhere", "--port", "99999"), "--port")


def test_chat_survives_non_utf8_input(work, tiny_dir):
    stdin = b"\xff\xfe not text\nhello\n/exit\n"
    code, output = cli_subprocess(
        "chat", tiny_dir, "--recipe", "tiny-cpu", "--set", "generation.max_new_tokens=4", cwd=work, stdin=stdin
    )
    assert code == 0, output
    assert "Traceback" not in output
    assert "not UTF-8" in output
    assert output.count("model> ") == 1  # the session went on and answered the next line


def test_the_installed_entry_point_uses_the_same_handler(work):
    code, output = cli_subprocess("recipe", "show", "tiny-cpu", "--set", "lora.r=100000", cwd=work)
    assert_clear_error(code, output, "lora.r")


def test_unreadable_recipe_is_not_a_recipe(work):
    folder = work / "dir.yaml"
    folder.mkdir()
    assert_clear_error(*cli("recipe", "show", folder), str(folder))
    assert stat.S_ISDIR(folder.stat().st_mode)


def test_eval_of_a_source_that_does_not_exist_creates_nothing(work):
    before = snapshot(work)
    code, output = cli("eval", "runs/tiny-cpx", "--recipe", "tiny-cpu")
    assert code != 0 and "Traceback" not in output
    assert snapshot(work) == before  # no runs/tiny-cpx/ made for the results of a model that is not there
