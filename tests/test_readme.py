"""README.md, walked as written (issue 24): its shell and Python blocks run in order, offline, in a scratch
copy of the repository, after the demo's run exists, and the errors it shows are the ones the CLI prints.

The README's conventions, which this test reads:

- a block whose first line is ``# needs: ...`` needs what it says (the network, a CUDA GPU, a server
  running) and is not run here;
- a block whose first line is ``# file: PATH`` is a file's contents, not commands (tests/test_families.py
  checks the family example);
- a ``text`` block that starts with ``$ COMMAND`` shows what that command prints: it is run, and each
  line shown must start the line printed (``...`` cuts a line short);
- ``make demo`` runs the Makefile's demo command; ``make test`` is this suite, not run again.

Everything else runs as written, with the environment ``make`` gives (HF_HUB_OFFLINE=1) and the
``codetune`` command on PATH. One thing is added to make it quick: ``CODETUNE_SET`` (README, "Recipes")
caps every training (and GRPO) at a few steps and every answer at a few tokens; the commands are the README's own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NEEDS, FILE = "# needs:", "# file:"
QUICK = " ".join(
    [
        "training.max_steps=6",
        "training.eval_steps=null",
        "training.save_strategy=no",
        "generation.max_new_tokens=16",
        "evaluation.samples=4",
        "evaluation.compare_base=false",
        # GRPO, where a recipe has it (CODETUNE_SET's rl.* items never add the stage to one without)
        "rl.max_steps=2",
        "rl.num_generations=2",
        "rl.prompts_per_step=2",
        "rl.max_completion_length=16",
        "rl.max_tasks=4",
        "rl.filter_samples=0",
        "rl.save_steps=null",
    ]
)


@dataclass
class Block:
    lang: str
    body: str
    line: int  # where it starts in README.md

    @property
    def first(self) -> str:
        return self.body.splitlines()[0] if self.body.strip() else ""

    @property
    def runs(self) -> bool:
        return self.lang in ("bash", "python") and not self.first.startswith((NEEDS, FILE))

    @property
    def shows_output(self) -> bool:
        return self.lang == "text" and self.first.startswith("$ ")


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        blocks.append(Block(m.group(1), "\n".join(body) + "\n", start))
        i += 1
    return blocks


def demo_command() -> str:
    """What ``make demo`` runs: the Makefile's demo recipe, with the venv's codetune on PATH."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    (command,) = [line.strip() for line in recipe if line.strip()]
    return command.replace("$(BIN)/", "")


def test_the_readmes_blocks_follow_its_conventions():
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert demo_command() == "codetune run tiny-cpu --overwrite"
    run = [b for b in blocks if b.runs]
    assert len(run) >= 10 and any(b.shows_output for b in blocks)
    for b in blocks:
        if b.lang == "bash" and b.first.startswith(NEEDS):
            assert len(b.first) > len(NEEDS) + 3, f"README.md:{b.line}: say what the block needs"
    # the commands that need a GPU or the hub are marked, not left for a reader to find out
    hub_recipes = ("phi3-mini-python", "qwen2.5-coder-1.5b-python")
    for b in run:
        for line in b.body.splitlines():
            if re.match(r"^\s*(codetune|accelerate) .*\b(train|run|prepare)\b", line):
                assert not any(f" {r}" in line for r in hub_recipes), f"README.md:{b.line}: unmarked: {line}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, codetune_home) -> tuple[Path, dict]:
    """A copy of the repository (without runs/, the venv, caches), ``codetune`` and ``python`` on PATH."""
    root = tmp_path_factory.mktemp("readme") / "codetune"
    skip = shutil.ignore_patterns(".git", ".venv", "runs", ".pytest_cache", "__pycache__", ".whl", "*.egg-info")
    shutil.copytree(ROOT, root, ignore=skip)
    bin_dir = root.parent / "bin"
    bin_dir.mkdir()
    (bin_dir / "codetune").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m codetune.cli "$@"\n')
    (bin_dir / "codetune").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(root / "src"),
        "HF_HUB_OFFLINE": "1",  # as make sets it
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CODETUNE_HOME": str(codetune_home),
        "CODETUNE_SET": QUICK,
        "COLUMNS": "200",
    }
    env.pop("CODETUNE_DEBUG", None)
    return root, env


def _run(script: list[str], root: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        script, cwd=root, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def _check_shown_output(block: Block, root: Path, env: dict) -> None:
    command, *shown = block.body.rstrip("\n").splitlines()
    env = {k: v for k, v in env.items() if k != "CODETUNE_SET"}  # exactly what a reader sees
    env["HF_HOME"] = str(root.parent / "empty-hf-cache")  # offline as on a fresh machine: no hub files cached
    res = _run(["bash", "-c", command[2:]], root, env)
    printed = (res.stdout + res.stderr).splitlines()
    where = f"README.md:{block.line}: {command}"
    if shown and shown[0].startswith("error:"):
        assert res.returncode == 2, f"{where}: exit {res.returncode}\n{res.stderr}"
    assert len(printed) >= len(shown), f"{where}\nprinted:\n{res.stdout}{res.stderr}"
    for want, got in zip(shown, printed, strict=False):
        assert got.startswith(want.split("...")[0].rstrip()), f"{where}\nshown:   {want}\nprinted: {got}"


def test_the_readme_runs_as_written_after_the_demo(scratch):
    root, env = scratch
    blocks = readme_blocks((root / "README.md").read_text(encoding="utf-8"))
    times = []
    for block in blocks:
        t0 = time.perf_counter()
        if block.shows_output:
            _check_shown_output(block, root, env)
        elif block.runs and block.lang == "bash":
            body = re.sub(r"^make demo\b", demo_command(), block.body, flags=re.M)
            body = re.sub(r"^make test\b.*$", ": make test is this suite", body, flags=re.M)
            res = _run(["bash", "-e", "-o", "pipefail", "-c", body], root, env)
            assert res.returncode == 0, f"README.md:{block.line}: exit {res.returncode}\n{body}\n{res.stderr[-4000:]}"
            assert "Traceback" not in res.stderr, f"README.md:{block.line}\n{res.stderr[-4000:]}"
        elif block.runs and block.lang == "python":
            script = root / f"readme_{block.line}.py"
            script.write_text(block.body)
            res = _run([sys.executable, script.name], root, env)
            assert res.returncode == 0, f"README.md:{block.line}\n{res.stderr[-4000:]}"
            # the Python API prints what the snippet prints: no loading bars, notices or warnings
            assert res.stderr == "", f"README.md:{block.line}: printed to stderr:\n{res.stderr[-4000:]}"
        else:
            continue
        times.append((block.line, round(time.perf_counter() - t0, 1)))
    print("\nREADME blocks (line, seconds):", times)
