"""The design rules of the code, checked like behaviour: the layer contract (import-linter), no import
cycle counting imports made inside functions, a run's file names spelled only in rundir.py, no function
over 60 lines (scripts/check_structure.py), and the pipeline owned by the library, not the CLI."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_structure  # noqa: E402


def test_the_layer_contract_holds():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    res = subprocess.run([lint, "--no-logo"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


def test_the_structure_script_finds_nothing():
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_structure.py")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout
    assert res.stdout.strip().endswith("0 problem(s)")


def test_the_script_sees_function_local_imports_and_long_functions(tmp_path):
    """The checks themselves can fail: a loop made only by a function-local import, a literal run file
    name and a long function are each found (and an import under TYPE_CHECKING is not a loop)."""
    pkg = tmp_path / "codetune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .high import g\n    return g\n")
    (pkg / "high.py").write_text("from .low import f\n\nPATH = 'eval/summary.json'\n")
    (pkg / "typed.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .high import f\n"
    )
    (pkg / "low2.py").write_text("from .typed import TYPE_CHECKING\n")
    (pkg / "long.py").write_text("def long():\n" + "    x = 1\n" * 61)
    edges = check_structure.graph(pkg)
    assert check_structure.cycles(edges) == [["codetune.high", "codetune.low"]]
    assert "codetune.high" not in edges["codetune.typed"]
    assert any("long: 62 lines" in p for p in check_structure.long_functions(pkg))
    assert any("spells 'summary.json'" in p for p in check_structure.layout_literals(pkg))
    assert check_structure.main(["check", str(pkg)]) == 1


def test_the_cli_run_command_only_parses_and_calls_the_pipeline():
    """`codetune run` is a few lines: it calls codetune.pipeline.run and prints; no stage is called from
    the CLI's run command itself."""
    tree = ast.parse((ROOT / "src" / "codetune" / "cli.py").read_text())
    run_cmd = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "run_cmd")
    called = {n.func.id for n in ast.walk(run_cmd) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "_pipeline" in called
    assert not called & {"prepare", "train", "evaluate", "write_card", "check_fresh", "check_integrations"}
    assert run_cmd.end_lineno - run_cmd.lineno < 25


def test_codetune_run_is_the_python_api():
    import codetune
    from codetune import pipeline

    assert callable(codetune.run) and pipeline.STAGES == ("prepare", "train", "rl", "evaluate", "card")
