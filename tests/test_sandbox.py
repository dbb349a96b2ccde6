"""The sandbox that runs model-written code: verdicts, limits, and hostile programs.

Hostile cases use small limits so the file stays fast. Isolation-dependent cases skip, with the reason, when
``isolation_report()`` says this machine/user does not get that isolation (root with bubblewrap gets all of
it). The attacks that go through eval's scoring path are in test_sandbox_attacks.py.
"""

import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from codetune import sandbox
from codetune.sandbox import UID_BASE, UID_COUNT, Limits, Verdict, isolation_report, run_program, run_programs

ROOT = Path(__file__).resolve().parents[1]
REPORT = isolation_report()
FAST = Limits(timeout_s=2.0, cpu_s=5, memory_mb=256, file_size_mb=1, output_bytes=1000)

needs_uid = pytest.mark.skipif(
    not REPORT.get("separate_uid"),
    reason="no dedicated sandbox uid (parent is not root): programs run as the caller's own user",
)
needs_netns = pytest.mark.skipif(
    not REPORT.get("network_namespace"), reason="no network namespace available: programs share the host network"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
needs_bwrap = pytest.mark.skipif(
    REPORT.get("level") != "bwrap", reason=f"bubblewrap isolation unavailable here: {REPORT.get('notes')}"
)


def live_processes_of_uid(uid: int) -> list[int]:
    """Running (non-zombie) processes whose real, effective, saved or fs uid is ``uid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{name}/stat").read_bytes()
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        if stat_line[stat_line.rfind(b")") + 2 :].split()[0] in (b"Z", b"X"):
            continue
        uids = next([int(u) for u in line.split()[1:]] for line in status.splitlines() if line.startswith("Uid:"))
        if uid in uids:
            found.append(int(name))
    return found


def pid_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return state[state.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


# ---------------------------------------------------------------------------------------------- report


def test_isolation_report_describes_this_machine():
    for key in ("root", "separate_uid", "network_namespace", "network_method", "kill_by_uid", "interpreter"):
        assert key in REPORT
    assert all(isinstance(v, bool | str) for v in REPORT.values())
    assert REPORT["available"] is True and os.path.isfile(REPORT["interpreter"]), REPORT
    assert REPORT["root"] == (os.geteuid() == 0)
    assert REPORT["level"] in ("bwrap", "process")
    if os.geteuid() == 0:
        # CI runs as root: everything the sandbox promises for root must actually be in place.
        assert REPORT["separate_uid"] and REPORT["kill_by_uid"] and not REPORT["can_signal_parent"], REPORT
    if REPORT["level"] == "bwrap":
        assert REPORT["filesystem_isolated"] and REPORT["pid_namespace"] and REPORT["ipc_namespace"], REPORT
        assert REPORT["network_namespace"] and not REPORT["parent_home_readable"], REPORT
    assert isolation_report() == REPORT  # probed once, cached


def test_ci_runs_the_strong_isolation_level():
    """CI (root, `make test` installs bubblewrap) must never score with the fallback; neither may a root
    machine that has bwrap. A user's clone without bwrap gets the fallback, and this test says so."""
    if not (os.environ.get("CI") or (os.geteuid() == 0 and shutil.which("bwrap"))):
        pytest.skip(f"not CI and not root with bwrap: the fallback is allowed here ({REPORT['level']})")
    assert REPORT["level"] == "bwrap", REPORT["notes"]


# ---------------------------------------------------------------------------------------------- verdicts


def test_passing_program_passes_and_keeps_its_output():
    v = run_program("def add(a, b):\n    return a + b\n\nprint('hello')\nassert add(2, 3) == 5\n", FAST)
    assert isinstance(v, Verdict)
    assert (v.passed, v.status, v.error) == (True, "passed", None), v
    assert v.stdout == "hello\n"  # the end-of-tests marker is not part of the output
    assert 0 < v.duration_s < FAST.timeout_s


def test_check_candidate_style_program_passes():
    source = textwrap.dedent(
        """
        import math, hashlib, re, collections, itertools, heapq
        def has_close_elements(numbers, threshold):
            return any(abs(a - b) < threshold for a, b in itertools.combinations(numbers, 2))

        def check(candidate):
            assert candidate([1.0, 2.0, 3.9, 4.0], 0.3) is True
            assert candidate([1.0, 2.0, 3.0], 0.5) is False

        check(has_close_elements)
        """
    )
    assert run_program(source, FAST).passed


def test_failing_assert_fails_with_the_exception_name():
    v = run_program("def f(x):\n    return x\n\nassert f(1) == 2\n", FAST)
    assert (v.passed, v.status) == (False, "failed")
    assert "AssertionError" in v.error


def test_syntax_error_fails():
    v = run_program("def f(:\n    return 1\n", FAST)
    assert (v.passed, v.status) == (False, "failed")
    assert "SyntaxError" in v.error


@pytest.mark.parametrize(
    "leave",
    [
        "exit(0)",
        "quit()",
        "import sys; sys.exit(0)",
        "import os; os._exit(0)",
        "raise SystemExit(0)",
        "raise SystemExit",
    ],
)
def test_leaving_before_the_tests_end_is_a_failure(leave):
    v = run_program(f"def f():\n    return 1\n\n{leave}\nassert f() == 2\n", FAST)
    assert (v.passed, v.status) == (False, "failed"), v
    assert v.error == "exited with code 0 before the tests finished"


TAMPERING = {
    "fake AssertionError + silent excepthook": """
        import builtins, sys
        class Fake(Exception):
            pass
        builtins.AssertionError = Fake
        sys.modules["builtins"].AssertionError = Fake
        sys.excepthook = lambda *args: None
        assert 1 == 2
        """,
    "atexit forces exit code 0": """
        import atexit, os
        atexit.register(lambda: os._exit(0))
        assert 1 == 2
        """,
    "sys.modules swapped": """
        import sys, types
        sys.modules["sys"] = types.ModuleType("sys")
        sys.modules["os"] = types.ModuleType("os")
        sys.modules["builtins"] = types.ModuleType("builtins")
        assert 1 == 2
        """,
    "sys.exit and os._exit replaced": """
        import os, sys
        sys.exit = lambda *a: None
        os._exit = lambda *a: None
        assert 1 == 2
        """,
}


@pytest.mark.parametrize("source", TAMPERING.values(), ids=TAMPERING.keys())
def test_tampering_does_not_turn_a_failing_assert_into_a_pass(source):
    v = run_program(textwrap.dedent(source), FAST)
    assert not v.passed, v
    assert v.status == "failed"


def test_asserts_survive_pythonoptimize_in_the_parent_environment(monkeypatch):
    monkeypatch.setenv("PYTHONOPTIMIZE", "2")
    assert not run_program("assert 1 == 2\n", FAST).passed
    flags = "import sys\nassert sys.flags.optimize == 0 and __debug__\nassert sys.flags.isolated == 1\n"
    assert run_program(flags, FAST).passed


def test_environment_is_scrubbed_and_workdir_is_private_and_removed(monkeypatch):
    monkeypatch.setenv("CODETUNE_SANDBOX_SECRET", "do-not-leak")
    name = f"scratch-{secrets.token_hex(6)}.txt"
    source = textwrap.dedent(
        f"""
        import os, sys
        allowed = {{"PATH", "LANG", "HOME", "TMPDIR", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "PWD"}}
        assert set(os.environ) <= allowed, sorted(os.environ)
        assert os.environ["PATH"] == "/usr/bin:/bin"
        assert os.environ["HOME"] == os.environ["TMPDIR"] == os.getcwd()
        assert sys.stdin.read() == ""  # the source cannot be re-read from stdin
        open({name!r}, "w").write("ok")  # the working directory is writable
        assert open({name!r}).read() == "ok"
        print(os.path.abspath({name!r}))
        """
    )
    v = run_program(source, FAST)
    assert v.passed, v
    written = v.stdout.strip()
    assert written.endswith(name) and not os.path.exists(written)


# ---------------------------------------------------------------------------------------------- limits / hostile


def test_infinite_loop_times_out_quickly():
    start = time.monotonic()
    v = run_program("while True:\n    pass\n", FAST)
    elapsed = time.monotonic() - start
    assert (v.passed, v.status) == (False, "timeout"), v
    assert v.error == "timed out after 2.0s"
    assert elapsed < FAST.timeout_s + 2


def test_cpu_limit_kills_a_busy_program():
    v = run_program("while True:\n    pass\n", Limits(timeout_s=10, cpu_s=1))
    assert (v.passed, v.status) == (False, "killed"), v
    assert "SIGXCPU" in v.error and v.duration_s < 5


def test_fork_bomb_is_contained_and_cleaned_up():
    start = time.monotonic()
    source = "import os\nprint(os.getuid(), flush=True)\nwhile True:\n    os.fork()\n"
    v = run_program(source, Limits(timeout_s=3, cpu_s=5, memory_mb=256))
    assert not v.passed, v
    assert time.monotonic() - start < 8
    if REPORT.get("rlimit_nproc_effective"):  # the bomb hits RLIMIT_NPROC (EAGAIN) instead of running to timeout
        assert v.status == "failed" and "BlockingIOError" in v.error, v
    if REPORT.get("kill_by_uid"):
        uid = int(v.stdout.split()[0])
        assert UID_BASE <= uid < UID_BASE + UID_COUNT
        assert live_processes_of_uid(uid) == []


@needs_uid
def test_daemon_that_left_the_session_is_killed():
    # Under bwrap the printed pid is the daemon's pid in the sandbox's PID namespace: only the uid says
    # anything on the host.
    # Double fork + setsid: the grandchild is in no process group of ours and not our descendant; the
    # program itself exits normally (and passes), the daemon must still not survive it.
    source = textwrap.dedent(
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                print(os.getpid(), os.getuid(), flush=True)
                time.sleep(20)
            os._exit(0)
        time.sleep(0.3)
        """
    )
    v = run_program(source, FAST)
    assert v.passed, v
    daemon, uid = map(int, v.stdout.split())
    if not REPORT.get("pid_namespace"):
        assert not pid_running(daemon)
    assert UID_BASE <= uid < UID_BASE + UID_COUNT
    assert live_processes_of_uid(uid) == []


@pytest.mark.parametrize(
    "source", ["x = bytearray(10**10)\n", "x = []\nwhile True:\n    x.append(bytearray(10**6))\n"], ids=["one", "grow"]
)
def test_memory_bomb_fails(source):
    v = run_program(source, Limits(timeout_s=10, memory_mb=256))
    assert not v.passed and v.status in ("failed", "killed"), v
    assert v.duration_s < 5


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_is_capped_and_does_not_reach_parent_memory(stream):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    v = run_program(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 10000)\n", FAST)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert not v.passed and v.status in ("failed", "killed"), v
    assert len(v.stdout) <= FAST.output_bytes and len(v.stderr) <= FAST.output_bytes
    assert len(getattr(v, stream)) > 0
    assert after - before < 50 * 1024


@needs_uid
def test_cannot_write_outside_the_working_directory():
    name = f"sandbox_escape_{secrets.token_hex(4)}.txt"
    targets = [ROOT / name, Path(REPORT["parent_home"]) / name, Path("/etc") / name]
    source = "paths = %r\nfor p in paths:\n    try:\n        open(p, 'w').write('escaped')\n    except OSError as e:\n"
    source = source % [str(t) for t in targets] + "        print('denied', e)\n"
    try:
        v = run_program(source, FAST)
        assert [t for t in targets if t.exists()] == []
        assert [line.split()[0] for line in v.stdout.splitlines()] == ["denied"] * len(targets), v
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


@needs_uid
def test_files_left_in_shared_tmp_dirs_are_removed():
    name = f"codetune_leak_{secrets.token_hex(4)}"
    paths = [f"/tmp/{name}", f"/dev/shm/{name}", f"/tmp/{name}_dir/inner"]
    source = f"import os\nos.mkdir('/tmp/{name}_dir')\nfor p in {paths!r}:\n    open(p, 'w').write('x')\n"
    try:
        v = run_program(source, FAST)
        assert v.passed, v
        assert [p for p in [*paths, f"/tmp/{name}_dir"] if os.path.lexists(p)] == []
    finally:
        shutil.rmtree(f"/tmp/{name}_dir", ignore_errors=True)
        for p in paths:
            Path(p).unlink(missing_ok=True)


@needs_uid
@pytest.mark.parametrize("how", ["listdir", "open"])
def test_cannot_read_the_parent_users_home(how):
    home = Path(REPORT["parent_home"])
    if not home.is_dir() or home.stat().st_mode & 0o005:
        pytest.skip(f"{home} is missing or world-readable, so there is nothing private to protect")
    if how == "listdir":
        # Under bwrap the home may exist inside, holding only the path to the bound interpreter (pyenv).
        interpreter = os.path.realpath(REPORT["interpreter"])
        allowed = {interpreter[len(str(home)) + 1 :].split("/")[0]} if interpreter.startswith(f"{home}/") else set()
        v = run_program(f"import os\nprint(sorted(os.listdir({str(home)!r})))\n", FAST)
        if v.passed:
            assert set(json.loads(v.stdout.replace("'", '"'))) <= allowed, v
            return
    else:
        files = [p for p in home.iterdir() if p.is_file()]
        if not files:
            pytest.skip(f"no regular file in {home} to try")
        v = run_program(f"print(open({str(files[0])!r}).read())\n", FAST)
    assert (v.passed, v.status) == (False, "failed"), v
    assert "PermissionError" in v.error or "FileNotFoundError" in v.error, v


@needs_netns
def test_no_network_even_to_localhost():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    port = server.getsockname()[1]
    try:
        source = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')\n"
        v = run_program(source, FAST)
        assert (v.passed, v.status) == (False, "failed"), v
        assert "Error" in v.error
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


@needs_bwrap
@needs_uid
def test_cannot_kill_the_parent_or_the_test_process():
    # The parent is the trusted harness (another uid); the test process is outside the PID namespace.
    source = textwrap.dedent(
        f"""
        import os, signal
        for target in (os.getppid(), {os.getpid()}):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError as e:
                print("denied", target, e, flush=True)
        try:
            os.killpg({os.getpgid(0)}, signal.SIGKILL)
        except OSError as e:
            print("denied group", e, flush=True)
        try:
            os.kill(-1, signal.SIGKILL)  # every process this uid may signal (on Linux, never the caller itself)
        except ProcessLookupError:  # none: in its PID namespace the harness is init, which kill(-1) skips
            pass
        print("survived kill(-1)", flush=True)
        """
    )
    v = run_program(source, FAST)
    assert [line.split()[0] for line in v.stdout.splitlines()] == ["denied", "denied", "denied", "survived"], v
    assert v.passed, v  # nothing outside the program was hit, and the program itself ran to its end


# ---------------------------------------------------------------------------------------------- parallel


def test_run_programs_parallel_in_order_with_progress():
    good = [f"assert {i} + 1 == {i + 1}\nprint({i})\n" for i in range(5)]
    sources = [good[0], "while True:\n    pass\n", good[1], "import os\nos.abort()\n", good[2], good[3],
               "raise RuntimeError('boom')\n", good[4]]  # fmt: skip
    done: list[int] = []
    start = time.monotonic()
    verdicts = run_programs(sources, FAST, workers=4, on_done=lambda i, v: done.append(i))
    assert time.monotonic() - start < FAST.timeout_s + 4
    assert len(verdicts) == 8 and sorted(done) == list(range(8))
    assert [v.status for v in verdicts] == ["passed", "timeout", "passed", "killed", "passed", "passed", "failed",
                                            "passed"]  # fmt: skip
    assert [v.stdout.strip() for i, v in enumerate(verdicts) if v.passed] == ["0", "1", "2", "3", "4"]
    assert verdicts[3].error == "killed by SIGABRT"
    assert "RuntimeError: boom" in verdicts[6].error
    assert run_programs([]) == []
    assert sandbox._uids_in_use == set()  # every uid lease was given back


@needs_uid
def test_concurrent_programs_get_distinct_uids():
    source = "import os, time\nprint(os.getuid())\ntime.sleep(0.5)\n"
    verdicts = run_programs([source] * 4, FAST, workers=4)
    uids = [int(v.stdout) for v in verdicts]
    assert len(set(uids)) == 4 and all(UID_BASE <= u < UID_BASE + UID_COUNT for u in uids), uids
    assert os.getuid() not in uids


def test_sandbox_unavailable_gives_an_error_verdict(monkeypatch):
    monkeypatch.setattr(sandbox, "_get_plan", lambda: (None, {"notes": "no interpreter"}))
    v = run_program("assert True\n", FAST)
    assert (v.passed, v.status) == (False, "error") and "no interpreter" in v.error


# ---------------------------------------------------------------------------------------------- non-root


NON_ROOT_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import sandbox
if sys.argv[2] in ("process", "no-unshare"):
    sandbox._BWRAP = None
if sys.argv[2] == "no-unshare":
    sandbox._UNSHARE = None
fast = sandbox.Limits(timeout_s=2.0)
programs = {
    "pass": "assert 1 + 1 == 2\\n",
    "fail": "assert 1 + 1 == 3\\n",
    "exit0": "exit(0)\\nassert False\\n",
    "loop": "while True:\\n    pass\\n",
    "fork": "import os\\nwhile True:\\n    os.fork()\\n",
    "net": "import socket\\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\\n",
}
names = list(programs)
verdicts = sandbox.run_programs([programs[n] for n in names], fast, workers=2)
status = {n: v.status for n, v in zip(names, verdicts)}
# A child that left the session while the program is still running: the timeout must take it down too.
escapee = "import os, time\\npid = os.fork()\\nif pid == 0:\\n    os.setsid()\\n    time.sleep(30)\\n    os._exit(0)\\n"
v = sandbox.run_program(escapee + "print(pid, flush=True)\\nwhile True:\\n    pass\\n", fast)
try:
    assert not sandbox.isolation_report()["pid_namespace"]  # else the pid is one inside the sandbox
    state = open(f"/proc/{int(v.stdout)}/stat").read().rsplit(")", 1)[1].split()[0]
except (OSError, ValueError, AssertionError):
    state = "gone"
status["escapee"] = v.status + ("" if state in ("Z", "X", "gone") else ", escapee alive")
print(json.dumps({"report": sandbox.isolation_report(), "status": status}))
"""


@needs_root
@pytest.mark.parametrize("mode", ["default", "process", "no-unshare"])
def test_degrades_gracefully_without_root(mode):
    """Run the module as an unprivileged user (nobody): it must fall back, say so, and still judge correctly.

    default: bwrap in an unprivileged user namespace where the kernel allows it; process: the named fallback
    (bwrap unavailable); no-unshare: the fallback without even a network namespace."""
    interpreter = "/usr/bin/python3"  # one an unprivileged uid can run (the venv's is under /root)
    if not os.path.isfile(interpreter):
        pytest.skip(f"{interpreter} is missing: no interpreter that an unprivileged user can run")
    tmp = tempfile.mkdtemp(prefix="codetune-sandbox-nonroot-")
    try:
        os.chmod(tmp, 0o755)
        harness = Path(sandbox.__file__).with_name("sandbox_harness.py")
        for src in (sandbox.__file__, harness):
            shutil.copy(src, os.path.join(tmp, os.path.basename(src)))
            os.chmod(os.path.join(tmp, os.path.basename(src)), 0o644)
        Path(tmp, "script.py").write_text(NON_ROOT_SCRIPT)
        os.chmod(os.path.join(tmp, "script.py"), 0o644)
        out = subprocess.run(
            [interpreter, "-I", os.path.join(tmp, "script.py"), tmp, mode],
            user=65534, group=65534, extra_groups=[], cwd=tmp, env={"PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=40,
        )  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    report, status = result["report"], result["status"]
    assert report["root"] is False and report["separate_uid"] is False and report["kill_by_uid"] is False
    if mode == "default" and report["level"] == "bwrap":  # the parent is outside its PID namespace
        assert report["can_signal_parent"] is False and report["filesystem_isolated"] is True
    else:
        assert report["level"] == "process" and report["can_signal_parent"] is True
    if mode == "no-unshare":
        assert report["network_namespace"] is False and report["network_method"] == "none"
    assert status["pass"] == "passed"
    assert status["fail"] == status["exit0"] == "failed"
    assert status["loop"] == "timeout"
    assert status["fork"] != "passed"
    assert status["net"] == "failed"  # nothing listens on port 9 (discard) either way
    assert status["escapee"] == "timeout"
