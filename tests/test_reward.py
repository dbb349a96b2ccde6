"""The RL reward (issue 20, points 3 and 6): eval's own scoring path, so a policy that cheats gets nothing.

Every completion here goes through ``codetune.reward.reward_function``, the function GRPOTrainer calls,
and the real sandbox. A scripted correct policy gets full reward; each known cheat gets zero (never a
masked None, which would hide it from the group's baseline); a sandbox failure is masked; a completion
that learns the rewarded tests rather than the task is caught by the held-back ones.
"""

from pathlib import Path

import pytest

from codetune import reward as reward_mod
from codetune.reward import RewardTask, reward_function, score, signals
from codetune.sandbox import Verdict
from codetune.starter import load_starter
from codetune.suites import Task


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
