"""The reward of reinforcement learning on code: the sandbox's verdict on each completion.

It is eval's scoring path, not a second one: the answer's code is found by ``extract_code``, packed with
the task's tests by ``scored_program`` and run by the sandbox's ``run_programs`` with the same limits and
isolation as ``codetune eval``, so a completion is rewarded exactly when eval would count it passed. The
candidate's calls cross a pipe as plain data and the verdict travels on a descriptor the candidate never
holds (docs/sandbox.md): exiting early, results equal to anything, reading the tests from frames, writing
to descriptors and planting files all fail there, and so they earn nothing here.

What a reward needs beyond eval's pass/fail:

- **masking**: a verdict of ``error`` is the sandbox's failure (no free uid, a full disk), not the
  program's; its reward is None, which TRL's GRPOTrainer leaves out of the group's baseline;
- **held-back tests**: a task's tests are split into the rewarded ones and held-back ones that are only
  measured, so that learning the visible tests rather than the task shows as a gap between the two;
- **an optional format reward**: a weight (``rl.format_reward``) times 1 when the answer's code parses and
  defines the task's function, added to the tests' reward. It pays for form, not behaviour (an empty
  function earns it), so it stays small beside the tests' reward, and every check of cheating reads the
  tests' part (``Reward.value``);
- **signals**: code that reaches for the harness's ways in (``sys.exit``, ``__eq__`` overrides, frame or gc
  introspection, ``/proc``, descriptors) is counted, never rewarded or punished, so a drift towards them
  is seen in the metrics even though the sandbox fails it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from .sandbox import Limits, Program, run_programs
from .suites import Task, extract_code, scored_program

RewardKind = Literal["all_pass", "pass_fraction"]
EVAL_LIMITS = Limits()  # eval's own limits
REWARDS: tuple[str, ...] = ("all_pass", "pass_fraction")

# Ways into the harness; each is counted per completion (see the module's docstring).
SIGNALS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern)
    for name, pattern in {
        "exit": r"\b(?:sys\.exit|os\._exit|os\.abort|exit\(|quit\()",
        "eq_override": r"def\s+__(?:eq|ne|hash|bool|len)__\s*\(",
        "introspection": r"\b(?:inspect\.|sys\._getframe|f_back|f_globals|f_locals|gc\.get_(?:objects|referrers))",
        "proc": r"/proc/",
        "descriptors": r"\bos\.(?:write|dup2?|fdopen|close|closerange|read)\s*\(",
        "builtins": r"__builtins__|\bimport\s+builtins\b|\bsys\.modules\b",
    }.items()
}


@dataclass(frozen=True)
class RewardTask:
    """A task to reward completions on: its prompt, entry point and setup (``task``), the tests whose
    verdict is the reward, and held-back tests that are only measured."""

    task: Task
    rewarded: tuple[str, ...]
    heldback: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.rewarded:
            raise ValueError(f"task {self.task.task_id}: no rewarded tests; a reward needs at least one")

    @classmethod
    def split(cls, task: Task, tests: Sequence[str], *, hold_back_every: int = 3) -> RewardTask:
        """Hold back every ``hold_back_every``-th test (the 3rd, 6th, ...), never all of them: a task with
        fewer tests than that holds none back."""
        tests = [t for t in tests if t.strip()]
        heldback = tests[hold_back_every - 1 :: hold_back_every] if hold_back_every > 0 else []
        rewarded = [t for i, t in enumerate(tests) if (i + 1) % hold_back_every != 0] if heldback else tests
        return cls(task, tuple(rewarded), tuple(heldback))


@dataclass(frozen=True)
class Reward:
    """One completion's reward: ``value`` 0..1, or None when masked (the sandbox failed, not the program)."""

    value: float | None
    verdict: str  # the rewarded run's: passed, failed, timeout, killed, error
    heldback: bool | None  # the held-back tests passed; None: the task holds none back, or masked
    signals: tuple[str, ...]
    code: str
    formed: bool = False  # the code parses and defines the task's function (the format reward's test)


def signals(code: str) -> tuple[str, ...]:
    """The names of SIGNALS that ``code`` matches, in SIGNALS' order."""
    return tuple(name for name, pattern in SIGNALS.items() if pattern.search(code))


def well_formed(code: str, entry_point: str | None) -> bool:
    """The code parses and defines ``entry_point`` at its top level (any statement, without one named)."""
    try:
        body = ast.parse(code).body
    except (SyntaxError, ValueError):  # ValueError: a null byte
        return False
    if not entry_point:
        return bool(body)
    return any(isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == entry_point for node in body)


def _programs(rt: RewardTask, code: str, kind: RewardKind) -> list[Program]:
    """The rewarded runs (one for all_pass; one per test for pass_fraction), then the held-back run."""
    if kind == "all_pass":
        runs = [replace(rt.task, tests="\n".join(rt.rewarded) + "\n")]
    else:
        runs = [replace(rt.task, tests=test + "\n") for test in rt.rewarded]
    if rt.heldback:
        runs.append(replace(rt.task, tests="\n".join(rt.heldback) + "\n"))
    return [scored_program(task, code) for task in runs]


def score(
    tasks: Sequence[RewardTask],
    completions: Sequence[str],
    *,
    kind: RewardKind = "all_pass",
    limits: Limits = EVAL_LIMITS,
    workers: int | None = None,
) -> list[Reward]:
    """The reward of ``completions[i]`` as an answer to ``tasks[i]``: every program of every distinct
    completion runs in one call of the sandbox, in parallel on the machine's cores."""
    if kind not in REWARDS:
        raise ValueError(f"reward {kind!r}: use one of {', '.join(REWARDS)}")
    if len(tasks) != len(completions):
        raise ValueError(f"{len(tasks)} tasks for {len(completions)} completions")
    codes = [extract_code(c, rt.task.entry_point) for rt, c in zip(tasks, completions, strict=True)]
    # A group's samples repeat one another (a trained policy at a moderate temperature writes the same answer
    # often): each distinct (task, code) runs once, and its verdicts are every copy's
    unique = {(id(rt), code): (rt, code) for rt, code in zip(tasks, codes, strict=True)}
    programs_of = {key: _programs(rt, code, kind) for key, (rt, code) in unique.items()}
    verdicts = iter(run_programs([p for programs in programs_of.values() for p in programs], limits, workers=workers))
    ran_of = {key: [next(verdicts) for _ in programs] for key, programs in programs_of.items()}
    rewards = []
    for rt, code in zip(tasks, codes, strict=True):
        ran = ran_of[id(rt), code]
        rewarded, held = (ran[:-1], ran[-1]) if rt.heldback else (ran, None)
        status = next((v.status for v in rewarded if v.status == "error"), None) or _worst(rewarded)
        # a completion of a given preamble (HumanEval's style) is judged with it, as it runs
        formed = well_formed(f"{rt.task.preamble}\n{code}" if rt.task.preamble else code, rt.task.entry_point)
        if status == "error" or (held is not None and held.status == "error"):
            rewards.append(Reward(None, "error", None, signals(code), code, formed))
            continue
        value = sum(v.passed for v in rewarded) / len(rewarded)
        rewards.append(Reward(value, status, None if held is None else held.passed, signals(code), code, formed))
    return rewards


def _worst(verdicts) -> str:
    """The status that says most about a failure: a timeout or kill over a plain failure."""
    order = ("timeout", "killed", "failed", "passed")
    return min((v.status for v in verdicts), key=lambda s: order.index(s) if s in order else 0)


# MBPP's train split (task ids 601-974): the tasks RL may learn from; its test ids (11-510) are eval's and its
# validation (511-600) and prompt (1-10) ids are left alone too
MBPP_TRAIN_IDS = range(601, 975)
TASK_FIELDS = ("task_id", "prompt", "tests", "entry_point", "setup")


def mbpp_train_tasks(source: str, *, hold_back_every: int = 3) -> list[RewardTask]:
    """MBPP's train split as reward tasks (the mbpp suite's prompt: the text and its asserts), never a test row.
    The rewarded asserts are shown in the prompt, as MBPP's format has them; held-back ones are not."""
    from .suites._benchmarks import load_mbpp
    from .suites.mbpp import entry_point_of, mbpp_prompt

    tasks = []
    for r in load_mbpp(source, test_only=False):
        if int(r["task_id"]) not in MBPP_TRAIN_IDS:
            continue
        tests = [t for t in r["test_list"] if t.strip()]
        task = Task(
            suite="rl",
            task_id=f"mbpp/{r['task_id']}",
            prompt=[],
            reference=r["code"].replace("\r\n", "\n"),
            entry_point=entry_point_of(tests),
            setup=(r.get("test_setup_code") or "").replace("\r\n", "\n"),
        )
        rt = RewardTask.split(task, tests, hold_back_every=hold_back_every)
        prompt = [{"role": "user", "content": mbpp_prompt(r["text"], list(rt.rewarded))}]
        tasks.append(replace(rt, task=replace(task, prompt=prompt)))
    return tasks


def load_task_file(path, *, hold_back_every: int = 3) -> list[RewardTask]:
    """A user's tasks: one JSON object per line with ``prompt`` (the user turn), ``tests`` (assert lines, at
    least one), and optionally ``task_id`` (default: the line number), ``entry_point`` and ``setup``. A bad
    line is a ValueError naming the file, the line and the field; nothing is half-read."""
    import json
    from pathlib import Path

    path = Path(path)
    tasks, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a task is a JSON object with {', '.join(TASK_FIELDS)}")
        unknown = sorted(set(row) - set(TASK_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r}; a task has {', '.join(TASK_FIELDS)}")
        prompt, tests = row.get("prompt"), row.get("tests")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: field 'prompt' must be a non-empty string")
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise ValueError(f"{where}: field 'tests' must be a non-empty list of test lines (asserts)")
        for name in ("task_id", "entry_point", "setup"):
            if row.get(name) is not None and not isinstance(row[name], str):
                raise ValueError(f"{where}: field {name!r} must be a string")
        task_id = row.get("task_id") or f"line-{n}"
        if task_id in seen:
            raise ValueError(f"{where}: field 'task_id': {task_id!r} is used by an earlier line")
        seen.add(task_id)
        for i, test in enumerate(tests):
            try:
                compile(test, f"{where} tests[{i}]", "exec")
            except SyntaxError as exc:
                raise ValueError(f"{where}: field 'tests'[{i}] is not Python ({exc.msg})") from None
        task = Task(
            suite="rl",
            task_id=task_id,
            prompt=[{"role": "user", "content": prompt}],
            entry_point=row.get("entry_point"),
            setup=row.get("setup") or "",
        )
        tasks.append(RewardTask.split(task, tests, hold_back_every=hold_back_every))
    if not tasks:
        raise ValueError(f"{path}: no tasks (an empty file)")
    return tasks


def reward_function(
    tasks_by_id: dict[str, RewardTask],
    *,
    kind: RewardKind = "all_pass",
    limits: Limits = EVAL_LIMITS,
    format_weight: float = 0.0,
    on_scored: Callable[[list[Reward]], None] | None = None,
) -> Callable[..., list[float | None]]:
    """A reward function as TRL's GRPOTrainer calls it: ``f(prompts, completions, task_id=[...], **kw)``,
    the dataset's ``task_id`` column naming each row's task. Chat completions (a list of messages) are
    read as their last message's text. ``on_scored`` sees every batch's rewards (metrics, tests).

    The tests' reward plus ``format_weight`` for a well-formed answer, in one function rather than TRL's
    ``reward_weights`` over two: TRL leaves a completion out of its group's baseline only when every
    function returns None, and a masked completion must stay masked whatever its form."""
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight {format_weight}: use 0 to 1")

    def execution_reward(prompts: list[Any], completions: list[Any], task_id: list[str], **_: Any):
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        rewards = score([tasks_by_id[t] for t in task_id], texts, kind=kind, limits=limits)
        if on_scored is not None:
            on_scored(rewards)
        return [None if r.value is None else r.value + format_weight * r.formed for r in rewards]

    return execution_reward


__all__ = [
    "MBPP_TRAIN_IDS",
    "REWARDS",
    "SIGNALS",
    "Reward",
    "RewardKind",
    "RewardTask",
    "load_task_file",
    "mbpp_train_tasks",
    "reward_function",
    "score",
    "signals",
    "well_formed",
]
