"""What the CLI prints: exact when piped, a version, user-facing help, typos named as such, chat input."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml
from typer.testing import CliRunner

from codetune.cli import app
from codetune.recipe import load_recipe

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC), "COLUMNS": "80"}
    return subprocess.run(
        [sys.executable, "-m", "codetune.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def test_recipe_show_piped_is_valid_yaml_even_with_long_values(tmp_path):
    long = "x" * 150 + " words " * 30
    res = _cli("recipe", "show", "tiny-cpu", "--set", f"description={long}")
    assert res.returncode == 0, res.stderr
    mine = tmp_path / "mine.yaml"
    mine.write_text(res.stdout)
    assert yaml.safe_load(res.stdout)["description"].strip() == long.strip()
    assert load_recipe(mine) == load_recipe("tiny-cpu", [f"description={long}"])


def test_generate_output_is_not_wrapped_when_piped(monkeypatch):
    import codetune.generate as gen

    line = "def f(a_long_argument_name, another_long_argument_name):  return [a_long_argument_name] * 40  # " + "z" * 60
    # the command answers through a session; a stand-in gives the long line without loading a model
    monkeypatch.setattr(gen, "load_session", lambda source, recipe=None: SimpleNamespace(generate=lambda c: [line]))
    res = runner.invoke(app, ["generate", "builtin:tiny-phi3", "--prompt", "hi", "--recipe", "tiny-cpu"])
    assert res.exit_code == 0, res.output
    assert res.stdout == line + "\n"


def test_version_and_help_speak_to_users():
    from codetune import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"codetune {__version__}"
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "QLoRA" in res.stdout and "parses arguments" not in res.stdout


def test_a_mistyped_run_directory_is_named_not_taken_for_a_hub_id(tmp_path):
    (tmp_path / "runs" / "tiny-cpu").mkdir(parents=True)
    for source in ("runs/tiny-cpx", "./tiny-cpu", "runs/a/b"):
        for cmd in (["generate", source, "--prompt", "hi"], ["eval", source], ["chat", source]):
            res = _cli(*cmd, cwd=tmp_path)
            assert res.returncode == 2, (cmd, res.stdout, res.stderr)
            assert f"no such run directory or model folder: {source}" in res.stderr, res.stderr
            assert "Traceback" not in res.stderr and "connect" not in res.stderr


def test_no_compare_base_overrides_the_recipe(tmp_path, monkeypatch):
    import codetune.evaluate as ev

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(load_recipe("tiny-cpu").to_yaml())
    assert load_recipe(run / "recipe.yaml").evaluation.compare_base is True
    seen = []

    def fake(source, suites, *, compare_base, **kw):
        seen.append(compare_base)
        return {"suites": [], "results": {}}

    monkeypatch.setattr(ev, "evaluate", fake)
    # the command passes the flag on; without one, evaluate applies the recipe's default
    for flag, expected in (([], None), (["--no-compare-base"], False), (["--compare-base"], True)):
        res = runner.invoke(app, ["eval", str(run), *flag])
        assert res.exit_code == 0, res.output
        assert seen[-1] is expected, flag
    from codetune.source import Source

    recipe = load_recipe(run / "recipe.yaml")
    assert ev.compare_base_for(recipe, Source.of(run), None) is True
    assert ev.compare_base_for(recipe, Source.of(run), False) is False
    assert ev.compare_base_for(recipe, Source.of("builtin:tiny-phi3"), None) is False  # no adapter to switch off


def test_chat_line_editing_and_pasted_code_at_a_terminal():
    from prompt_toolkit import PromptSession
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from codetune.chat_input import terminal_turns

    with create_pipe_input() as inp:
        session = PromptSession(input=inp, output=DummyOutput())
        turns = terminal_turns(session=session)
        # left arrow twice then a letter: edited in place, not "^[[D" in the text
        inp.send_text("abc\x1b[D\x1b[DX\r")
        assert next(turns) == "aXbc"
        # a bracketed paste of several lines is one turn
        inp.send_text("\x1b[200~def f():\r    return 1\x1b[201~\r")
        assert next(turns) == "def f():\n    return 1"
        # Esc-Enter adds a line; a fence typed line by line is one turn too
        inp.send_text("first\x1b\rsecond\r")
        assert next(turns) == "first\nsecond"
        inp.send_text("```\rx = 1\r```\r")
        assert next(turns) == "```\nx = 1\n```"


def test_help_shows_no_type_for_flags():
    # a flag takes no value: `--version <bool>` read as if it took one
    for args in (["--help"], ["prepare", "--help"], ["eval", "--help"], ["recipe", "show", "--help"]):
        res = _cli(*args)
        assert res.returncode == 0, res.stderr
        assert "<bool>" not in res.stdout, (args, res.stdout)
    assert "--version" in _cli("--help").stdout and "<path>" in _cli("prepare", "--help").stdout
