"""The trusted harness's wire format, and the parts of two-process scoring that go beyond plain calls."""

import math
import secrets
import textwrap

import pytest

from codetune.sandbox import Limits, Program, run_program
from codetune.sandbox_harness import MAX_DEPTH, Unplain, decode, encode
from codetune.suites import scored_program
from codetune.suites.humaneval import humaneval_tasks

FAST = Limits(timeout_s=10.0, cpu_s=10, memory_mb=512)


def refuse(obj):
    raise Unplain(type(obj).__name__)


def no_handles(hid):
    raise AssertionError("no handle expected")


PLAIN = [
    None,
    True,
    False,
    0,
    -1,
    2**100,
    -(3**300),
    10**5000,  # past int-to-str's digit limit: crosses as bytes, not digits
    0.1,
    -0.0,
    float("inf"),
    1 + 2j,
    "",
    "h\u00e9llo \ud800",  # a lone surrogate survives
    b"\x00\xff",
    [],
    (),
    set(),
    frozenset({1, 2}),
    {(1, "a"): [None, {b"k": frozenset()}]},
    [[[[1]]]],
]


@pytest.mark.parametrize("value", PLAIN, ids=[f"{type(v).__name__}-{i}" for i, v in enumerate(PLAIN)])
def test_plain_values_cross_exactly(value):
    back = decode(encode(value, refuse), no_handles)
    assert back == value and type(back) is type(value)
    if type(value) is float:
        assert math.copysign(1, back) == math.copysign(1, value)


def test_nan_crosses():
    assert math.isnan(decode(encode(float("nan"), refuse), no_handles))


@pytest.mark.parametrize(
    "value",
    [type("A", (), {})(), type("I", (int,), {})(1), type("S", (str,), {})("x"), [object()], {"k": print}],
    ids=["object", "int-subclass", "str-subclass", "nested", "function"],
)
def test_anything_else_goes_through_on_other(value):
    with pytest.raises(Unplain):
        encode(value, refuse)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"Q",  # unknown tag
        b"N!",  # trailing bytes
        b"i\x00\x00\x00\x09\x01",  # length past the end
        b"l\xff\xff\xff\xff",  # a huge count with nothing behind it
        b"f\x00\x00",  # truncated float
        b"e\x00\x00\x00\x01l\x00\x00\x00\x00",  # an unhashable set member
        b"l\x00\x00\x00\x01" * (MAX_DEPTH + 5) + b"N",  # nested too deeply
    ],
)
def test_malformed_input_is_refused(data):
    with pytest.raises((ValueError, TypeError)):
        decode(data, no_handles)


def test_objects_of_the_candidates_classes_travel_as_handles():
    code = textwrap.dedent(
        """
        class Pair:
            def __init__(self, a, b):
                self.a, self.b = a, b
            def width(self):
                return self.b - self.a

        def max_chain_length(arr, n):
            arr = sorted(arr, key=lambda p: p.b)
            count, end = 0, float("-inf")
            for p in arr[:n]:
                if p.a > end:
                    count, end = count + 1, p.b
            return count

        def pairs():
            return iter([Pair(1, 2), Pair(3, 9)])
        """
    )
    tests = textwrap.dedent(
        """
        p = Pair(5, 24)
        assert max_chain_length([p, Pair(15, 25), Pair(27, 40), Pair(50, 60)], 4) == 3
        assert p == p and p != Pair(5, 24)  # a handle equals only itself
        assert p.a == 5 and p.width() == 19  # attributes and methods, read remotely
        assert [q.width() for q in pairs()] == [1, 6]
        try:
            max_chain_length([lambda: 1], 1)
        except TypeError as e:  # a test's own object is not plain data
            assert "plain data only" in str(e)
        else:
            raise AssertionError("a function crossed")
        """
    )
    v = run_program(Program(code=code, tests=tests), FAST)
    assert v.passed, v


def test_exceptions_come_back_as_themselves():
    code = "def div(a, b):\n    return a // b\n\nclass Odd(Exception):\n    pass\n\ndef odd():\n    raise Odd('x')\n"
    tests = textwrap.dedent(
        """
        try:
            div(1, 0)
        except ZeroDivisionError as e:
            assert "division" in str(e)
        try:
            odd()
        except Exception as e:
            assert type(e).__name__ == "RemoteError" and str(e) == "Odd: x"
        assert div(7, 2) == 3
        """
    )
    assert run_program(Program(code=code, tests=tests), FAST).passed


def test_the_tests_use_the_benchmarks_helpers_not_the_candidates():
    # HumanEval/32's tests check find_zero with the prompt's poly(): a completion that also redefines poly to
    # return 0 would pass them if the tests used the candidate's poly.
    task = next(t for t in humaneval_tasks() if t.task_id == "HumanEval/32")
    cheat = "def poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 0.0\n"
    v = run_program(scored_program(task, cheat), FAST)
    assert (v.passed, v.status) == (False, "failed"), v
    assert run_program(scored_program(task, task.reference), FAST).passed


def test_the_candidate_cannot_read_the_tests():
    # The candidate process is forked before the harness reads the tests: nothing of them is in its memory, so
    # a candidate that searches its memory for the expected value finds nothing.
    secret = f"hidden-expected-value-{secrets.token_hex(6)}"
    code = textwrap.dedent(
        """
        import gc, re

        def answer():
            for obj in gc.get_objects():
                texts = obj.values() if isinstance(obj, dict) else [obj]
                for text in texts:
                    if isinstance(text, str):
                        found = re.search(r"hidden-expected-value-[0-9a-f]{12}", text)
                        if found:
                            return found.group(0)
            return None
        """
    )
    v = run_program(Program(code=code, tests=f"assert answer() == {secret!r}\n"), FAST)
    assert (v.passed, v.status) == (False, "failed"), v
    # the same search does find a value that is in the candidate's own memory
    v = run_program(Program(code=code + f"\nKNOWN = {secret!r}\n", tests=f"assert answer() == {secret!r}\n"), FAST)
    assert v.passed, v


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xff\xff\xff", b"\x00\x00\x00\x05Qxxxx", b"\x00\x00\x00\x02t\x00", b"\x00\x00\x00\x01N"],
    ids=["huge-length", "unknown-tag", "truncated", "not-a-reply"],
)
def test_a_candidate_that_writes_garbage_into_the_protocol_fails_cleanly(garbage):
    code = textwrap.dedent(
        f"""
        import os

        def add(a, b):
            for fd in range(3, 64):  # the pipe to the harness is one of them
                try:
                    os.write(fd, {garbage!r})
                except OSError:
                    pass
            return a + b
        """
    )
    v = run_program(Program(code=code, tests="assert add(2, 3) == 5\n"), FAST)
    assert (v.passed, v.status) == (False, "failed"), v
