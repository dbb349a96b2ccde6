"""The RL reward (issue 20, points 3 and 6): eval's own scoring path, so a policy that cheats gets nothing.

Every completion here goes through ``codetune.reward.reward_function``, the function GRPOTrainer calls,
and the real sandbox. A scripted correct policy gets full reward; each known cheat gets zero (never a
masked None, which would hide it from the group's baseline); a sandbox failure is masked; a completion
that learns the rewarded tests rather than the task is caught by the held-back ones.
"""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from codetune import reward as reward_mod
from codetune.reward import RewardTask, reward_function, score, signals
from codetune.sandbox import Verdict
from codetune.starter import load_starter
from codetune.suites import Task

from .conftest import MBPP_JSONL, needs_mbpp


@pytest.fixture(scope="module")
def palindrome() -> RewardTask:
    row = next(r for r in load_starter() if r["task_id"] == "starter/0")
    task = Task(
        suite="starter",
        task_id=row["task_id"],
        prompt=[{"role": "user", "content": row["instruction"]}],
        reference=row["output"],
        entry_point=row["entry_point"],
    )
    return RewardTask.split(task, row["test_list"])


CORRECT = "```python\ndef is_palindrome(s):\n    t = s.lower()\n    return t == t[::-1]\n```"

PLANTED = Path("/tmp/codetune-reward-planted")
# The known cheats of RL on code, each written as a policy would write it.
CHEATS = {
    "exit 0 before the tests": "import os\ndef is_palindrome(s):\n    os._exit(0)\nos._exit(0)\n",
    "sys.exit at import": "import sys\nsys.exit(0)\ndef is_palindrome(s):\n    return True\n",
    "equal to anything": (
        "class Anything:\n    def __eq__(self, other):\n        return True\n    def __bool__(self):\n"
        "        return True\n    __hash__ = object.__hash__\ndef is_palindrome(s):\n    return Anything()\n"
    ),
    "frame walking for the tests": (
        "import inspect\ndef is_palindrome(s):\n    f = inspect.currentframe()\n    while f is not None:\n"
        "        for v in f.f_locals.values():\n            if isinstance(v, bool):\n                return v\n"
        "        f = f.f_back\n    return None\n"
    ),
    "writing a verdict to descriptors": (
        "import os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, b'x\\tpassed\\t0\\t0\\t\\n')\n"
        "    except OSError:\n        pass\ndef is_palindrome(s):\n    return None\n"
    ),
    "files planted outside": (
        f"open({str(PLANTED)!r}, 'w').write('planted')\nimport os\n"
        "for d in ('/', os.path.expanduser('~'), '..'):\n    try:\n"
        "        open(os.path.join(d, 'codetune-planted'), 'w').write('x')\n    except OSError:\n        pass\n"
        "def is_palindrome(s):\n    return None\n"
    ),
    "a syntax error so that no test runs": "def is_palindrome(s:\n    return True\n",
    "reading the tests from /proc": (
        "import os\ndef is_palindrome(s):\n    for p in os.listdir('/proc'):\n        try:\n"
        "            if 'Racecar' in open(f'/proc/{p}/cmdline').read():\n                return True\n"
        "        except OSError:\n            pass\n    return False\n"
    ),
}


def test_a_correct_policy_gets_full_reward_and_every_cheat_gets_zero(palindrome):
    seen = []
    fn = reward_function({palindrome.task.task_id: palindrome}, on_scored=seen.extend)
    names = ["correct", *CHEATS]
    completions = [CORRECT, *CHEATS.values()]
    values = fn(
        prompts=[palindrome.task.prompt] * len(names), completions=completions, task_id=["starter/0"] * len(names)
    )
    got = dict(zip(names, values, strict=True))
    assert got["correct"] == 1.0
    for name in CHEATS:
        assert got[name] == 0.0, (name, got[name], seen[names.index(name)])
    rewards = dict(zip(names, seen, strict=True))
    assert rewards["correct"].heldback is True and rewards["correct"].signals == ()
    # the ways in are seen, though they earned nothing
    assert "exit" in rewards["exit 0 before the tests"].signals
    assert "eq_override" in rewards["equal to anything"].signals
    assert "introspection" in rewards["frame walking for the tests"].signals
    assert "descriptors" in rewards["writing a verdict to descriptors"].signals
    assert "proc" in rewards["reading the tests from /proc"].signals
    assert not PLANTED.exists()  # nothing reached the host


def test_chat_completions_are_read_as_their_last_message(palindrome):
    fn = reward_function({"starter/0": palindrome})
    chat = [[{"role": "assistant", "content": CORRECT}], [{"role": "assistant", "content": "no code here"}]]
    assert fn(prompts=[None, None], completions=chat, task_id=["starter/0", "starter/0"]) == [1.0, 0.0]


def test_a_completion_that_learns_the_visible_tests_is_caught_by_the_held_back_ones(palindrome):
    assert palindrome.rewarded == (
        "assert is_palindrome('Racecar') == True",
        "assert is_palindrome('hello') == False",
        "assert is_palindrome('Abba') == True",
    )
    assert palindrome.heldback == ("assert is_palindrome('') == True",)
    lookup = "def is_palindrome(s):\n    return {'Racecar': True, 'hello': False, 'Abba': True}[s]\n"
    (r,) = score([palindrome], [lookup])
    assert r.value == 1.0 and r.heldback is False  # every rewarded test passes, the held-back one does not


def test_pass_fraction_rewards_each_rewarded_test(palindrome):
    case_sensitive = "def is_palindrome(s):\n    return s == s[::-1]\n"  # fails 'Racecar' and 'Abba' only
    (frac,) = score([palindrome], [case_sensitive], kind="pass_fraction")
    (whole,) = score([palindrome], [case_sensitive], kind="all_pass")
    assert frac.value == pytest.approx(1 / 3) and whole.value == 0.0
    assert frac.heldback is True  # '' is a palindrome either way


def test_a_sandbox_failure_is_masked_not_scored_zero(palindrome, monkeypatch):
    def broken(programs, limits, workers=None):
        return [Verdict(False, "error", "sandbox error: no free uid", 0.0, "", "") for _ in programs]

    monkeypatch.setattr(reward_mod, "run_programs", broken)
    (r,) = score([palindrome], [CORRECT])
    assert r.value is None and r.verdict == "error"
    fn = reward_function({"starter/0": palindrome})
    assert fn(prompts=[None], completions=[CORRECT], task_id=["starter/0"]) == [None]


def test_the_format_reward_pays_for_form_and_never_unmasks(palindrome, monkeypatch):
    fn = reward_function({"starter/0": palindrome}, format_weight=0.1)
    empty = "def is_palindrome(s):\n    pass\n"  # the right function, wrong behaviour
    other = "def palindrome(s):\n    return s.lower() == s.lower()[::-1]\n"  # right behaviour, wrong name
    broken_syntax = CHEATS["a syntax error so that no test runs"]
    answers = [CORRECT, empty, other, "no code here", broken_syntax]
    got = fn(prompts=[None] * 5, completions=answers, task_id=["starter/0"] * 5)
    assert got == [pytest.approx(1.1), pytest.approx(0.1), 0.0, 0.0, 0.0]
    # a cheat that defines the function earns the format part and nothing of the tests'
    (cheat,) = score([palindrome], [CHEATS["equal to anything"]])
    assert cheat.value == 0.0 and cheat.formed
    # a body completing a given preamble is judged with it
    preamble = 'def is_palindrome(s):\n    """Is s a palindrome, case aside?"""\n'
    stub = RewardTask(replace(palindrome.task, preamble=preamble), palindrome.rewarded)
    (body,) = score([stub], ["```python\n    return s.lower() == s.lower()[::-1]\n```"])
    assert body.formed and body.value == 1.0
    with pytest.raises(ValueError, match="format_weight"):
        reward_function({"starter/0": palindrome}, format_weight=2.0)

    def broken(programs, limits, workers=None):
        return [Verdict(False, "error", "sandbox error: no free uid", 0.0, "", "") for _ in programs]

    monkeypatch.setattr(reward_mod, "run_programs", broken)
    assert fn(prompts=[None], completions=[CORRECT], task_id=["starter/0"]) == [None]  # masked, whatever its form


def test_splitting_tests_and_the_signals():
    task = Task(suite="x", task_id="x/1", prompt=[], entry_point="f")
    assert RewardTask.split(task, ["a", "b"]).heldback == ()  # too few to hold one back
    split = RewardTask.split(task, ["a", "b", "c", "d", "e", "f", "g"])
    assert split.rewarded == ("a", "b", "d", "e", "g") and split.heldback == ("c", "f")
    with pytest.raises(ValueError, match="no rewarded tests"):
        RewardTask(task, ())
    with pytest.raises(ValueError, match="use one of all_pass, pass_fraction"):
        score([split], ["x"], kind="most")
    assert signals("def f(x):\n    return x + 1\n") == ()
    assert signals("import sys\nsys.modules['x'] = 1\n__builtins__.print = None") == ("builtins",)


# ---------------------------------------------------------------------------------------
# Tasks as data (point 2): a user's JSONL file, MBPP's train split


def test_a_task_file_is_read_and_scored_through_the_same_path(tmp_path):
    from codetune.reward import load_task_file

    path = tmp_path / "tasks.jsonl"
    rows = [
        {"task_id": "add", "prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 0",
                                                                    "assert add(-1, 1) == 0"], "entry_point": "add"},
        {"prompt": "Write twice(x) using HALF.", "tests": ["assert twice(2) == 4"], "setup": "HALF = 0.5"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tasks = load_task_file(path)
    assert [t.task.task_id for t in tasks] == ["add", "line-2"]
    assert tasks[0].rewarded == ("assert add(1, 2) == 3", "assert add(0, 0) == 0")
    assert tasks[0].heldback == ("assert add(-1, 1) == 0",)
    assert tasks[1].task.setup == "HALF = 0.5" and tasks[1].heldback == ()
    rewards = score(tasks, ["def add(a, b):\n    return a + b\n", "def twice(x):\n    return x / HALF\n"])
    assert [(r.value, r.heldback) for r in rewards] == [(1.0, True), (1.0, None)]


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("{not json", "line 2: not JSON"),
        ('["a list"]', "line 2: a task is a JSON object"),
        ('{"prompt": "p", "tests": ["assert f()"], "answer": "x"}', "line 2: unknown field 'answer'"),
        ('{"prompt": "", "tests": ["assert f()"]}', "line 2: field 'prompt'"),
        ('{"prompt": "p", "tests": []}', "line 2: field 'tests' must be a non-empty list"),
        ('{"prompt": "p", "tests": ["assert f("]}', "line 2: field 'tests'[0] is not Python"),
        ('{"prompt": "p", "tests": ["assert f()"], "entry_point": 3}', "line 2: field 'entry_point'"),
        ('{"task_id": "one", "prompt": "p", "tests": ["assert f()"]}', "line 2: field 'task_id': 'one' is used"),
    ],
)
def test_a_bad_task_line_is_named_by_file_line_and_field(tmp_path, line, named):
    from codetune.reward import load_task_file

    path = tmp_path / "tasks.jsonl"
    path.write_text('{"task_id": "one", "prompt": "Write f().", "tests": ["assert f() == 1"]}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path} {named}")):
        load_task_file(path)


def test_rl_tasks_from_a_file_or_mbpp_train_and_a_bad_source_is_refused(tmp_path):
    from codetune.errors import RecipeError
    from codetune.recipe import load_recipe
    from codetune.rl import rl_tasks

    with pytest.raises(RecipeError, match=r"rl.tasks: use trained, fresh, mbpp-train or a .jsonl file"):
        load_recipe("tiny-cpu", ["rl.tasks=starter"])
    missing = tmp_path / "none.jsonl"
    with pytest.raises(RecipeError, match=f"rl.tasks: file not found: {re.escape(str(missing))}"):
        rl_tasks(load_recipe("tiny-cpu", [f"rl.tasks={missing}"]), tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    with pytest.raises(RecipeError, match=r"rl.tasks: .*bad.jsonl line 1: field 'tests'"):
        rl_tasks(load_recipe("tiny-cpu", [f"rl.tasks={bad}"]), tmp_path)


@needs_mbpp
def test_mbpp_train_tasks_are_the_train_split_and_never_a_test_row():
    from codetune.recipe import load_recipe
    from codetune.rl import rl_tasks

    recipe = load_recipe("tiny-cpu", ["rl.tasks=mbpp-train", f"evaluation.mbpp_source={MBPP_JSONL}"])
    tasks = rl_tasks(recipe, Path("unused"))
    ids = [int(t.task.task_id.split("/")[1]) for t in tasks]
    assert len(ids) == 374 and min(ids) == 601 and max(ids) == 974
    first = tasks[0]
    shown = first.task.prompt[0]["content"]
    # the rewarded asserts are in the prompt (MBPP's format), the held-back one is not
    assert all(t in shown for t in first.rewarded) and first.heldback and first.heldback[0] not in shown
    assert score([first], [f"```python\n{first.task.reference}\n```"])[0].value == 1.0


def test_repeated_answers_in_a_group_are_run_once_and_share_their_verdicts(palindrome, monkeypatch):
    ran = []
    real = reward_mod.run_programs

    def counting(programs, limits, workers=None):
        ran.extend(programs)
        return real(programs, limits, workers=workers)

    monkeypatch.setattr(reward_mod, "run_programs", counting)
    wrong = "def is_palindrome(s):\n    return False\n"
    group = [CORRECT, wrong, CORRECT, CORRECT, wrong, CORRECT, CORRECT, CORRECT]
    rewards = score([palindrome] * len(group), group)
    assert [r.value for r in rewards] == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert len(ran) == 2 * 2  # two distinct answers, each a rewarded run and a held-back run
