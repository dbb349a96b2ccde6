"""Run untrusted, model-written Python programs in a sandbox and decide pass/fail.

Two layers:

- **Isolation.** Where bubblewrap (``bwrap``) works, every program runs in private mount, PID, IPC, network,
  UTS and cgroup namespaces: a read-only view of the interpreter and its standard library (no site-packages,
  no home, no project), a fresh private ``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/run`` that vanish with it,
  all capabilities dropped, and, when the caller is root, dedicated unprivileged uids. Where it does not, the
  named fallback ``process`` is the process-level sandbox of old (own session, scrubbed environment,
  rlimits, and as root a network namespace and a dedicated uid).
- **Scoring.** The candidate's code never runs in the process that runs the tests. A trusted harness
  (``sandbox_harness.py``) forks a candidate process that runs the program and serves calls over pipes; the
  harness runs the tests with the candidate's top-level names as proxies, only plain data crossing. The
  pass signal is a verdict the harness writes, with a nonce only it knows, to a descriptor the candidate
  process closed before running anything.

docs/sandbox.md has the threat model; ``isolation_report()`` says what this machine and user get.
"""

from __future__ import annotations

import ast
import atexit
import ctypes
import fcntl
import functools
import glob
import grp
import importlib.util
import json
import logging
import marshal
import os
import pwd
import py_compile
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Limits",
    "Program",
    "SandboxUnavailable",
    "Verdict",
    "check_isolation",
    "isolation_report",
    "run_program",
    "run_programs",
    "UID_BASE",
    "UID_COUNT",
]

log = logging.getLogger(__name__)

# Dedicated sandbox uids (gid == uid); one per running process role, never one that has a passwd/group entry.
UID_BASE = 61000
UID_COUNT = 1000

LEVELS = ("bwrap", "process")  # strongest first

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38

# Everything the program sees of the environment (HOME and TMPDIR are its working directory). Note that -I
# makes the interpreter ignore PYTHON* variables, so PYTHONHASHSEED=0 is inert: str hashing stays randomized.
_BASE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
# -I: isolated mode (ignores PYTHON* variables such as PYTHONOPTIMIZE, no user site, no cwd on sys.path);
# -S: no site module (no site-packages on sys.path, and a 4x faster start); -B: no .pyc files.
# Never -O: asserts are the tests.
_PY_FLAGS = ["-I", "-S", "-B"]
# Process level only: top-level entries in these world-writable directories that a sandbox uid leaves
# behind are removed (under bwrap they are private tmpfs mounts that vanish with the program).
_SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_HARNESS_FILE = Path(__file__).with_name("sandbox_harness.py")
_HARNESS_SOURCE = _HARNESS_FILE.read_text(encoding="utf-8")
_HARNESS_MOUNT = "/opt/codetune"  # where bwrap shows the harness's folder
_BWRAP = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin:" + os.environ.get("PATH", ""))


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock; the whole process tree is killed at the limit
    cpu_s: int = 10  # RLIMIT_CPU, for the harness and the candidate each
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE (also caps captured stdout/stderr)
    processes: int = 32  # RLIMIT_NPROC (only meaningful under a dedicated uid)
    output_bytes: int = 4096  # how much of stdout/stderr tail is kept in the Verdict
    tmp_mb: int = 256  # size of each private tmpfs (/tmp, /var/tmp, /dev/shm, /run) under bwrap


@dataclass(frozen=True)
class Program:
    """What to run. ``code`` is untrusted and runs in the candidate process; the rest is trusted benchmark
    code that runs in the harness (``setup`` runs in the candidate process, right after ``code``, because it
    builds objects of the candidate's classes; the tests see what it defines as handles).

    A program with no ``tests`` passes when ``code`` runs to its end: then the code is its own judge, which is
    for trusted programs only (the benchmarks always separate the tests).
    """

    code: str
    tests: str = ""
    setup: str = ""
    prelude: str = ""  # benchmark helpers the tests call (HumanEval's prompt); the harness runs its own copy
    entry_point: str | None = None  # a name the prelude defines that the candidate must provide


@dataclass
class Verdict:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "killed" | "error"
    error: str | None
    duration_s: float
    stdout: str
    stderr: str


class SandboxUnavailable(RuntimeError):
    """The isolation that a caller required is not available here."""


# --------------------------------------------------------------------------------------------------------------
# libc helpers. Function pointers are resolved here, in the parent, so the child after fork() (preexec_fn)
# only makes plain foreign calls: no dlsym, no imports, nothing that takes a lock another thread could hold.


def _load_libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        unshare = libc.unshare
        unshare.argtypes = [ctypes.c_int]
        unshare.restype = ctypes.c_int
        prctl = libc.prctl
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl.restype = ctypes.c_int
        return unshare, prctl
    except (OSError, AttributeError):  # not glibc/Linux: no namespaces, no prctl
        return None, None


_UNSHARE, _PRCTL = _load_libc()


def _unshare(flags: int) -> None:
    if _UNSHARE is None:
        raise OSError("unshare() is not available")
    if _UNSHARE(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({flags:#x}): {os.strerror(err)}")


def _prctl(option: int, arg: int) -> None:
    if _PRCTL is None:
        raise OSError("prctl() is not available")
    if _PRCTL(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _write_proc(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------
# /proc: who is running


@dataclass(frozen=True)
class _Proc:
    pid: int
    state: str
    ppid: int
    pgrp: int
    sid: int
    uids: tuple[int, ...]  # real, effective, saved, filesystem

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X", "x")


def _procs(with_uids: bool = True) -> Iterator[_Proc]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                line = f.read()
            uids: tuple[int, ...] = ()
            if with_uids:
                with open(f"/proc/{name}/status", "rb") as f:
                    for row in f:
                        if row.startswith(b"Uid:"):
                            uids = tuple(int(x) for x in row.split()[1:])
                            break
        except (OSError, ValueError):
            continue  # exited meanwhile
        fields = line[line.rfind(b")") + 2 :].split()
        try:
            yield _Proc(int(name), fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3]), uids)
        except (IndexError, ValueError):
            continue


def _uid_table() -> Iterator[tuple[int, bool, tuple[int, ...]]]:
    """(pid, alive, uids) of every process, from /proc/N/status alone: the scans after every program and for
    every uid lease read one file per process, not two."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                data = f.read()
            state = data[data.index(b"\nState:") + 8 :].lstrip()[:1]
            start = data.index(b"\nUid:") + 5
            uids = tuple(int(x) for x in data[start : data.index(b"\n", start)].split())
        except (OSError, ValueError):
            continue  # exited meanwhile
        yield int(name), state not in (b"Z", b"X", b"x"), uids


def _uids_with_processes() -> set[int]:
    """Every uid that owns a process, zombies included (they still count against RLIMIT_NPROC)."""
    return {u for _, _, uids in _uid_table() for u in uids}


def _live_pids_of_tree(leader: int) -> list[int]:
    """Same-uid fallback: the leader's session and process group, plus its descendants while it is alive."""
    table = list(_procs(with_uids=False))
    found = {p.pid for p in table if p.alive and (p.sid == leader or p.pgrp == leader)}
    me = os.getpid()
    if any(p.pid == leader and p.ppid == me and p.alive for p in table):
        children: dict[int, list[int]] = {}
        for p in table:
            children.setdefault(p.ppid, []).append(p.pid)
        alive = {p.pid for p in table if p.alive}
        stack, seen = [leader], {leader}
        while stack:  # walk through every live descendant, also those already found by session
            pid = stack.pop()
            for child in children.get(pid, ()):
                if child not in seen and child in alive:
                    seen.add(child)
                    found.add(child)
                    stack.append(child)
    found.discard(me)
    return sorted(found)


def _kill_everything(leader: int, uids: list[int], grace_s: float = 5.0) -> bool:
    """SIGKILL the program's whole process tree; True once nothing of it is left running.

    Under bwrap the PID namespace dies with its init, which dies with the bwrap process (--die-with-parent).
    Under dedicated uids every process of those uids is the program's, including ones that left the process
    group with setsid(); RLIMIT_NPROC caps how many there can be, so repeated sweeps converge. Without one,
    only the session, the process group and descendants still attached to the leader can be found: they are
    SIGSTOPped first (a stopped process cannot fork, and the leader stays alive so the tree stays connected),
    then killed.
    """
    stopped: set[int] = set()
    if not uids:
        for _ in range(50):
            found = set(_live_pids_of_tree(leader)) - stopped
            if not found:
                break
            for pid in found:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except OSError:
                    pass
            stopped |= found
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    try:
        os.killpg(leader, signal.SIGKILL)
    except OSError:
        pass
    deadline = time.monotonic() + grace_s
    while True:
        if uids:
            victims = [pid for pid, alive, owners in _uid_table() if alive and any(u in owners for u in uids)]
        else:  # the ones already killed, until they are really gone (SIGKILL is asynchronous), and any new ones
            live = {p.pid for p in _procs(with_uids=False) if p.alive}
            victims = sorted((stopped & live) | set(_live_pids_of_tree(leader)))
        if not victims:
            return True
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


# --------------------------------------------------------------------------------------------------------------
# Dedicated uids: one per running process role, exclusive across threads (a set) and across processes (flock).

_uid_mutex = threading.Lock()
_uids_in_use: set[int] = set()


def _uid_lock_dir() -> str | None:
    path = os.path.join(tempfile.gettempdir(), f"codetune-sandbox-uids-{os.geteuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        log.warning("sandbox: %s is not a private directory; uid locks are process-local", path)
        return None
    return path


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    try:
        grp.getgrgid(uid)
        return True
    except KeyError:
        return False


class _UidLease:
    def __init__(self, busy: set[int] | None = None) -> None:
        self.uid, self._lock_fd = self._acquire(busy)

    @staticmethod
    def _acquire(busy: set[int] | None) -> tuple[int, int | None]:
        """``busy``: uids known to own a process (one /proc scan can serve several leases)."""
        with _uid_mutex:
            if busy is None:
                busy = _uids_with_processes()
            lock_dir = _uid_lock_dir()
            for uid in range(UID_BASE, UID_BASE + UID_COUNT):
                if uid in _uids_in_use or uid in busy or _has_account(uid):
                    continue
                fd = None
                if lock_dir is not None:
                    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                    fd = os.open(os.path.join(lock_dir, str(uid)), flags, 0o600)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        os.close(fd)
                        continue
                _uids_in_use.add(uid)
                return uid, fd
        raise RuntimeError(f"no free sandbox uid in {UID_BASE}-{UID_BASE + UID_COUNT - 1}")

    def release(self, sweep: bool = True) -> None:
        """Give the uid back; never raises, so a failed cleanup cannot keep a uid held. ``sweep``: remove what
        the uid left in the shared temporary directories (the process level has no private ones)."""
        try:
            if sweep:
                _remove_files_of_uid(self.uid)
        except Exception:  # noqa: S110 - best effort; the uid must be released whatever happens
            log.exception("sandbox: cleaning up after uid %s failed", self.uid)
        with _uid_mutex:
            _uids_in_use.discard(self.uid)
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None


def _remove_files_of_uid(uid: int) -> None:
    for base in _SHARED_TMP_DIRS:
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    _rmtree(entry.path)
            except OSError:
                pass


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _rmtree(path: str) -> None:
    """Remove ``path`` and everything under it; never raises, never follows a link, never recurses.

    Every step is relative to an open directory descriptor, so a tree deeper than PATH_MAX (or than Python's
    recursion limit, which ``shutil.rmtree`` hits) goes too; directories a program made unreadable (mode 000)
    are opened up first.
    """
    try:
        top = os.open(path, _DIR_FLAGS)
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    # (descriptor, name in its parent, subdirectories still to remove): the walk is a loop, not recursion
    stack: list[tuple[int, str, list[str]]] = [(top, "", _unlink_files(top))]
    while stack:
        fd, _name, subdirs = stack[-1]
        if subdirs:
            name = subdirs.pop()
            child = _open_subdir(fd, name)
            if child is not None:
                stack.append((child, name, _unlink_files(child)))
            continue
        _, name, _ = stack.pop()
        os.close(fd)
        if stack:
            try:
                os.rmdir(name, dir_fd=stack[-1][0])
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def _unlink_files(fd: int) -> list[str]:
    """Unlink every entry of the open directory ``fd`` that is not a directory; the names of those that are."""
    subdirs = []
    try:
        with os.scandir(fd) as it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                    else:
                        os.unlink(entry.name, dir_fd=fd)
                except OSError:
                    pass
    except OSError:
        pass
    return subdirs


def _open_subdir(fd: int, name: str) -> int | None:
    """A descriptor for the subdirectory ``name`` of ``fd``, opening up one a program made unreadable; None if
    it cannot be opened (it is then left)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except PermissionError:
        try:
            os.chmod(name, 0o700, dir_fd=fd, follow_symlinks=False)
            return os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError:
            return None
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------------------
# The isolation plan: chosen once per process by actually running a probe under each candidate setup.


@dataclass(frozen=True)
class _Plan:
    level: str  # "bwrap" | "process"
    interpreter: str
    drop_uid: bool  # dedicated uids (bwrap: one for the harness, one for the candidate; process: one)
    net: str  # process level: "netns" | "userns" | "none"; bwrap: "bwrap"


_NET_METHOD = {
    "bwrap": "bwrap --unshare-net",
    "netns": "unshare(CLONE_NEWNET)",
    "userns": "unshare(CLONE_NEWUSER|CLONE_NEWNET)",
    "none": "none",
}

_plan_mutex = threading.Lock()
_plan_cache: tuple[_Plan | None, dict[str, bool | str]] | None = None

_PROBE = """
import json, os, socket, sys
try:
    ifaces = sorted(name for _, name in socket.if_nameindex())
except OSError:
    ifaces = None
def visible(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []
print(json.dumps({{"uid": os.getuid(), "ifaces": ifaces, "home": visible({home!r}), "version": sys.version.split()[0],
                  "cwd": visible({cwd!r})}}))
"""


def _home_leaks(home: str, seen: list[str]) -> bool:
    """Whether a listing of the home directory shows more than the path to the bound interpreter (pyenv)."""
    exe = os.path.realpath(sys.executable)
    allowed = {exe[len(home) :].strip("/").split("/")[0]} if exe.startswith(home.rstrip("/") + "/") else set()
    return bool(set(seen) - allowed)


def _interpreter_candidates() -> list[str]:
    out: list[str] = []
    for path in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        if path and os.path.isfile(path) and os.path.realpath(path) not in map(os.path.realpath, out):
            out.append(path)
    return out


def _parent_home() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_dir
    except KeyError:
        return os.path.expanduser("~")


@functools.lru_cache(maxsize=1)
def _bwrap_mounts() -> tuple[str, ...]:
    """bwrap arguments that show the running interpreter (and nothing else of this machine) read-only.

    /usr and the merged-/usr links hold the shared libraries; an interpreter installed elsewhere (pyenv under
    /root) gets its binary, its libpython and its standard library bound at their own paths, so its
    compiled-in RUNPATH and prefix still work. Every site-packages/dist-packages directory inside what is
    bound is hidden under an empty tmpfs: no third-party package, no benchmark data, no codetune.
    """
    args = ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    exe = os.path.realpath(sys.executable)
    # The base installation's paths, not a virtual environment's (whose platstdlib is the venv itself).
    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    wanted = [exe, paths["stdlib"], paths["platstdlib"]]
    if libdir and soname and os.path.isfile(os.path.join(libdir, soname)):
        wanted.append(os.path.join(libdir, soname))
    bound: list[str] = []
    made: set[str] = set()
    for path in dict.fromkeys(os.path.realpath(p) for p in wanted if p):
        if not path.startswith("/usr/") and os.path.exists(path):
            # bwrap would copy /root's mode 700 for the parents it makes: the sandbox uids must traverse them
            parents = [str(p) for p in reversed(Path(path).parents) if str(p) != "/"]
            for parent in parents:
                if parent not in made:
                    args += ["--perms", "0755", "--dir", parent]
                    made.add(parent)
            args += ["--ro-bind", path, path]
            bound.append(path)
    hidden = {
        os.path.realpath(p)
        for root in [*bound, "/usr/lib", "/usr/local/lib"]
        for p in glob.glob(os.path.join(root, "python3*", "*-packages")) + glob.glob(os.path.join(root, "*-packages"))
        if os.path.isdir(p)
    }
    for path in sorted(hidden):
        args += ["--tmpfs", path]
    return tuple(args)


def _bwrap_command(plan: _Plan, limits: Limits) -> list[str]:
    size = str(limits.tmp_mb * 1024 * 1024)
    cmd = [_BWRAP or "bwrap", *_bwrap_mounts(), "--proc", "/proc", "--dev", "/dev"]
    for path in ("/tmp", "/var/tmp", "/dev/shm", "/run"):
        cmd += ["--perms", "1777", "--size", size, "--tmpfs", path]
    cmd += ["--perms", "1777", "--dir", "/run/lock"]
    # Not --unshare-all: as root that also makes a user namespace, in which setuid() to a dedicated uid is
    # impossible (only root is mapped). Root needs no user namespace for the others.
    cmd += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    # Not --as-pid-1: bwrap's own init keeps its parent-death signal (setuid() clears the harness's), so the
    # whole PID namespace dies with bwrap, which dies with codetune.
    cmd += ["--hostname", "sandbox", "--die-with-parent", "--new-session", "--chdir", "/tmp"]
    harness = _harness_dir(plan.interpreter)
    if harness:
        cmd += ["--ro-bind", harness, _HARNESS_MOUNT]
    if plan.drop_uid:  # the harness starts as root without any other capability, and sets the uids itself
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user", "--cap-drop", "ALL"]
    return cmd


@functools.cache
def _harness_dir(interpreter: str) -> str | None:
    """A root-owned, read-only folder with the harness and its bytecode, compiled once per process: compiling
    it at every start costs each program about 15 ms. None (the source goes by -c) for another interpreter."""
    if os.path.realpath(interpreter) != os.path.realpath(sys.executable):
        return None
    try:
        folder = tempfile.mkdtemp(prefix="codetune-harness-", dir=_private_tmp_base())
        atexit.register(shutil.rmtree, folder, True)
        target = os.path.join(folder, _HARNESS_FILE.name)
        shutil.copyfile(_HARNESS_FILE, target)
        cache = importlib.util.cache_from_source(target)
        py_compile.compile(
            target, cfile=cache, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH
        )
        for path in (folder, os.path.dirname(cache)):
            os.chmod(path, 0o755)  # the sandbox uids read it; nobody but its owner writes it
        for path in (target, cache):
            os.chmod(path, 0o644)
        return folder
    except (OSError, py_compile.PyCompileError) as exc:
        log.warning("sandbox: cannot prepare the harness's bytecode (%s); it is compiled at every start", exc)
        return None


def _harness_command(plan: _Plan) -> list[str]:
    folder = _harness_dir(plan.interpreter)
    if folder is None:
        return [plan.interpreter, *_PY_FLAGS, "-c", _HARNESS_SOURCE]
    where = _HARNESS_MOUNT if plan.level == "bwrap" else folder
    boot = f"import sys; sys.path.insert(0, {where!r}); import sandbox_harness; sandbox_harness.entry()"
    return [plan.interpreter, *_PY_FLAGS, "-c", boot]


def _probe(plan: _Plan, home: str) -> tuple[dict | None, str]:
    source = _PROBE.format(home=home, cwd=os.getcwd())
    try:
        res = _execute(Program(source), plan, Limits(timeout_s=20.0))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return None, f"{plan.level} {plan.interpreter}: {exc}"
    if res.timed_out or not res.verdict or res.verdict.get("status") != "passed":
        why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}, verdict {res.verdict}"])[-1]
        return None, f"{plan.level} {plan.interpreter}: {why}"
    try:
        info = json.loads(res.stdout.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None, f"{plan.level} {plan.interpreter}: unreadable probe output"
    if plan.drop_uid and not UID_BASE <= info["uid"] < UID_BASE + UID_COUNT:
        return None, f"{plan.level} {plan.interpreter}: still uid {info['uid']}"
    if plan.net != "none" and info["ifaces"] != ["lo"]:
        return None, f"{plan.level} {plan.interpreter}: {plan.net} left interfaces {info['ifaces']}"
    if plan.level == "bwrap" and (_home_leaks(home, info["home"]) or info["cwd"]):
        return None, f"bwrap {plan.interpreter}: the host's home or working directory is visible"
    return info, ""


def _choose_plan() -> tuple[_Plan | None, dict[str, bool | str]]:
    root = os.geteuid() == 0
    home = _parent_home()
    options: list[_Plan] = []
    if _BWRAP:
        options.append(_Plan("bwrap", os.path.realpath(sys.executable), root, "bwrap"))
    # The process-level fallback, strongest first. Running untrusted code as root (root that cannot setuid)
    # is a last resort, reported.
    process = [(True, "netns"), (True, "userns"), (True, "none"), (False, "netns")] if root else []
    process += [(False, "userns"), (False, "none")]
    options += [_Plan("process", i, d, n) for d, n in process for i in _interpreter_candidates()]
    notes: list[str] = [] if _BWRAP else ["bubblewrap (bwrap) is not installed"]
    for plan in options:
        info, why = _probe(plan, home)
        if info is None:
            notes.append(f"[{plan.level}, uid={'dedicated' if plan.drop_uid else 'same'}, net={plan.net}] {why}")
            continue
        if root and not plan.drop_uid:
            log.warning("sandbox: running as root and cannot drop to a dedicated uid; programs run as root")
        return plan, _report(root, home, plan, info, notes)
    return None, _report(root, home, None, None, ["no interpreter could be run in the sandbox", *notes])


def _report(root: bool, home: str, plan: _Plan | None, info: dict | None, notes: list[str]) -> dict[str, bool | str]:
    drop = plan is not None and plan.drop_uid
    net = plan.net if plan is not None else "none"
    bwrap = plan is not None and plan.level == "bwrap"
    return {
        "available": plan is not None,
        "level": plan.level if plan else "none",  # "bwrap" (strong) | "process" (the named fallback) | "none"
        "root": root,
        "separate_uid": drop,  # dedicated unprivileged uids/gids, no supplementary groups
        "uid_range": f"{UID_BASE}-{UID_BASE + UID_COUNT - 1}" if drop else "",
        "network_namespace": net != "none",
        "network_method": _NET_METHOD[net],
        "pid_namespace": bwrap,
        "ipc_namespace": bwrap,
        "filesystem_isolated": bwrap,  # own root: read-only interpreter + stdlib, private tmpfs /tmp etc.
        "rlimit_nproc_effective": drop,  # per-program uid: a fork bomb hits the limit, nothing else shares it
        "kill_by_uid": drop,  # leftovers (setsid() daemons too) are found and killed by uid
        "can_signal_parent": not (drop or bwrap),
        "parent_home": home,
        "parent_home_readable": _home_leaks(home, info["home"]) if info else False,
        "no_new_privs": bwrap or _PRCTL is not None,
        "capabilities": "none" if bwrap else ("root's" if root and not drop else "none"),
        "seccomp": False,
        "scoring": "two processes: trusted harness + candidate process, plain data over pipes",
        "bwrap": _BWRAP or "",
        "interpreter": plan.interpreter if plan else "",
        "python_version": str(info["version"]) if info else "",
        "notes": "; ".join(notes),
    }


def _get_plan() -> tuple[_Plan | None, dict[str, bool | str]]:
    global _plan_cache
    with _plan_mutex:
        if _plan_cache is None:
            _plan_cache = _choose_plan()
        return _plan_cache


def isolation_report() -> dict[str, bool | str]:
    """What this machine and user actually get (probed once per process by running a program).

    ``level`` is ``"bwrap"`` (namespaces and a private filesystem), ``"process"`` (the named fallback) or
    ``"none"`` (nothing could run).
    """
    return dict(_get_plan()[1])


FALLBACK_WARNING = (
    "WARNING: the code sandbox runs at the 'process' level (bubblewrap is unavailable: {why}). Model-written "
    "code can read whatever this user can read, including benchmark answers, and can leave files in /tmp. "
    "Install bubblewrap (apt-get install bubblewrap) or set evaluation.sandbox: strict to refuse to run."
)


def check_isolation(policy: str = "auto") -> dict[str, bool | str]:
    """The isolation report, checked against ``policy``: ``strict`` raises ``SandboxUnavailable`` unless the
    level is bwrap; ``auto`` logs a loud warning on the fallback. Call it before executing anything."""
    report = isolation_report()
    if report["level"] == "bwrap":
        return report
    why = str(report.get("notes") or "no reason recorded")
    if policy == "strict" or report["level"] == "none":
        raise SandboxUnavailable(
            f"{policy!r} needs the 'bwrap' isolation level but this machine gives {report['level']!r} ({why}); "
            "install bubblewrap (apt-get install bubblewrap) or set evaluation.sandbox: auto to accept the fallback"
        )
    log.warning(FALLBACK_WARNING.format(why=why))
    return report


# --------------------------------------------------------------------------------------------------------------
# Running one program


@dataclass
class _Result:
    returncode: int | None
    timed_out: bool
    duration_s: float
    verdict: dict | None  # the harness's verdict (nonce checked), None when it left none
    stdout: str
    stderr: str
    clean: bool


def _rlimits(limits: Limits, dedicated_uid: bool) -> list[tuple[int, int, int]]:
    mb = 1024 * 1024
    nproc = limits.processes
    if not dedicated_uid:
        # RLIMIT_NPROC counts every process of the real uid: leave room for what the user already runs.
        me = os.getuid()
        nproc += sum(1 for p in _procs() if p.uids and p.uids[0] == me)
    wanted = [
        (resource.RLIMIT_CPU, limits.cpu_s, limits.cpu_s + 1),  # SIGXCPU at the soft limit, SIGKILL 1 s later
        (resource.RLIMIT_AS, limits.memory_mb * mb, limits.memory_mb * mb),
        (resource.RLIMIT_FSIZE, limits.file_size_mb * mb, limits.file_size_mb * mb),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    out = []
    for res, soft, hard in wanted:
        _, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY and os.geteuid() != 0:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        out.append((res, soft, hard))
    return out


def _make_preexec(plan: _Plan, uid: int | None, rlimits: list[tuple[int, int, int]]) -> Callable[[], None]:
    parent = os.getpid()
    process_level = plan.level == "process"

    def preexec() -> None:  # runs in the child between fork and exec; stdout/stderr are already the files
        try:
            for res, soft, hard in rlimits:
                resource.setrlimit(res, (soft, hard))
            if process_level:
                if plan.net == "netns":
                    _unshare(_CLONE_NEWNET)  # needs root: before dropping privileges
                if uid is not None:
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)  # as root this sets real, effective and saved uid
                if plan.net == "userns":
                    me, my_gid = os.getuid(), os.getgid()
                    if uid is not None and _PRCTL is not None:
                        _prctl(_PR_SET_DUMPABLE, 1)  # setuid() made /proc/self root-owned: the maps need it
                    _unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
                    _write_proc("/proc/self/setgroups", b"deny")
                    _write_proc("/proc/self/uid_map", f"{me} {me} 1".encode())
                    _write_proc("/proc/self/gid_map", f"{my_gid} {my_gid} 1".encode())
            if _PRCTL is not None:
                _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # no setuid binaries, no file capabilities
                _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
            if os.getppid() != parent:  # the parent died before PDEATHSIG was armed
                os._exit(125)
        except BaseException as exc:
            os.write(2, f"codetune sandbox setup failed: {exc!r}\n".encode())
            raise

    return preexec


def _private_tmp_base() -> str:
    base = tempfile.gettempdir()
    if os.geteuid() == 0:  # the sandbox uid must be able to reach its working directory
        path = os.path.realpath(base)
        while True:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return "/tmp"
            if path == "/":
                break
            path = os.path.dirname(path)
    return base


def _tail(fd: int, n: int) -> bytes:
    size = os.fstat(fd).st_size
    start = max(0, size - n)
    return os.pread(fd, size - start, start)


def _read_verdict(fd: int, nonce: str) -> dict | None:
    """The harness's verdict line (sandbox_harness._verdict); None when there is none with this run's nonce."""
    fields = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace").split("\n", 1)[0].split("\t", 4)
    if len(fields) != 5 or fields[0] != nonce or not fields[2].isdigit() or not fields[3].isdigit():
        return None
    return {"status": fields[1], "signal": int(fields[2]), "exit_code": int(fields[3]), "error": fields[4]}


@functools.lru_cache(maxsize=256)
def _imports(code: str) -> frozenset[str]:
    """Standard-library modules that trusted benchmark code imports (the harness imports them before it
    forks, once for both processes)."""
    if not code:
        return frozenset()
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return frozenset()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return frozenset(n for n in names if n.partition(".")[0] in sys.stdlib_module_names)


def _write_file(path: str, data: bytes) -> int:
    """A new file (never an existing one or a link), written and rewound; the descriptor is inheritable."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the process to end; False at the timeout. A pidfd wakes up the moment it ends (Popen.wait with
    a timeout polls, with sleeps of up to 50 ms: a third of a short program's time)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if ready:
        proc.wait()
    return bool(ready)


@dataclass(frozen=True)
class _JobFiles:
    """The descriptors of one run's files: the candidate and the tests in, the verdict and the output out."""

    candidate: int
    tests: int
    verdict: int
    stdout: int
    stderr: int


def _execute(program: Program, plan: _Plan, limits: Limits) -> _Result:
    leases: list[_UidLease] = []
    run_dir = None
    fds: list[int] = []
    try:
        _lease_uids(plan, leases)
        uids = [lease.uid for lease in leases]
        run_dir = tempfile.mkdtemp(prefix="codetune-sandbox-", dir=_private_tmp_base())
        nonce = secrets.token_hex(16)
        files = _write_job_files(program, nonce, run_dir, fds)
        cmd, cwd, env, preexec = _harness_invocation(program, plan, limits, run_dir, uids, files)
        proc, timed_out, duration, clean = _run_harness(cmd, cwd, env, preexec, files, limits, uids)
        out = _tail(files.stdout, limits.output_bytes) if limits.output_bytes > 0 else b""
        err = _tail(files.stderr, limits.output_bytes) if limits.output_bytes > 0 else b""
        return _Result(
            returncode=proc.returncode,
            timed_out=timed_out,
            duration_s=duration,
            verdict=None if timed_out else _read_verdict(files.verdict, nonce),
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            clean=clean,
        )
    finally:
        try:
            for fd in fds:
                os.close(fd)
            if run_dir is not None:
                _rmtree(run_dir)
        finally:
            for lease in leases:
                lease.release(sweep=plan.level == "process")


def _lease_uids(plan: _Plan, leases: list[_UidLease]) -> None:
    """Lease the plan's dedicated uids into ``leases`` one by one, so the caller releases those it got even when
    a later one fails."""
    if plan.drop_uid:
        busy = _uids_with_processes()
        leases.append(_UidLease(busy))  # the harness (and, at the process level, the candidate too)
        if plan.level == "bwrap":
            leases.append(_UidLease(busy))  # the candidate: it cannot signal or trace the harness


def _write_job_files(program: Program, nonce: str, run_dir: str, fds: list[int]) -> _JobFiles:
    """The run's files in ``run_dir``; each descriptor joins ``fds`` as soon as it is open, so the caller closes
    it whatever fails next."""
    candidate = marshal.dumps({"code": program.code, "setup": program.setup})
    job = {"nonce": nonce, "tests": program.tests, "prelude": program.prelude, "entry_point": program.entry_point}
    fds.append(in_fd := _write_file(os.path.join(run_dir, "candidate"), candidate))
    fds.append(tests_fd := _write_file(os.path.join(run_dir, "tests"), marshal.dumps(job)))
    fds.append(verdict_fd := _write_file(os.path.join(run_dir, "verdict"), b""))
    fds.append(out_fd := _write_file(os.path.join(run_dir, "stdout"), b""))
    fds.append(err_fd := _write_file(os.path.join(run_dir, "stderr"), b""))
    return _JobFiles(in_fd, tests_fd, verdict_fd, out_fd, err_fd)


def _harness_invocation(
    program: Program, plan: _Plan, limits: Limits, run_dir: str, uids: list[int], files: _JobFiles
) -> tuple[list[str], str, dict, Callable[[], None] | None]:
    """(command, working directory, environment, preexec_fn) that start the harness on the run's files."""
    harness = [*_harness_command(plan), str(files.tests), str(files.verdict)]
    warm = ",".join(_imports(program.prelude) | _imports(program.tests))
    rlimits = _rlimits(limits, bool(uids))
    if plan.level == "bwrap":
        # The harness sets the limits itself, before it forks: no preexec_fn, so the host (which may hold a
        # model in memory) starts bwrap with vfork instead of copying its page tables.
        limits_arg = ",".join(f"{r}:{soft}:{hard}" for r, soft, hard in rlimits)
        harness += [str(uids[1]), str(uids[0]), warm, limits_arg] if uids else ["-1", "-1", warm, limits_arg]
        cmd, cwd = _bwrap_command(plan, limits) + ["--", *harness], run_dir
        env = dict(_BASE_ENV, HOME="/tmp", TMPDIR="/tmp")
    else:
        harness += ["-1", "-1", warm, ""]  # the preexec made the whole process the dedicated uid, with limits
        os.chmod(run_dir, 0o711)  # the sandbox uid may traverse it (to reach work/) but not list it
        cwd = os.path.join(run_dir, "work")
        os.mkdir(cwd, 0o700)
        if uids:
            os.chown(cwd, uids[0], uids[0])
        cmd, env = harness, dict(_BASE_ENV, HOME=cwd, TMPDIR=cwd)
    preexec = _make_preexec(plan, uids[0] if uids else None, rlimits) if plan.level == "process" else None
    return cmd, cwd, env, preexec


def _run_harness(
    cmd: list[str],
    cwd: str,
    env: dict,
    preexec: Callable[[], None] | None,
    files: _JobFiles,
    limits: Limits,
    uids: list[int],
) -> tuple[subprocess.Popen, bool, float, bool]:
    """Run the harness within the time limit and kill whatever it leaves: (the process, whether it timed out,
    its duration, whether every process of the program is gone)."""
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=files.candidate,
            stdout=files.stdout,
            stderr=files.stderr,
            pass_fds=(files.tests, files.verdict),
            cwd=cwd,
            env=env,
            start_new_session=True,
            umask=0o077,
            preexec_fn=preexec,
        )
    except subprocess.SubprocessError as exc:  # preexec_fn failed; it wrote why to the stderr file
        raise RuntimeError(_last_line(_tail(files.stderr, 1000).decode("utf-8", "replace")) or str(exc)) from exc
    timed_out = False
    try:
        timed_out = not _wait(proc, limits.timeout_s)
    finally:
        if proc.poll() is None:
            _kill_everything(proc.pid, uids)
            proc.wait()
        duration = time.monotonic() - start
        # Daemons, setsid() escapees, fork-bomb leftovers. Under bwrap the kernel kills the whole PID namespace
        # when its init ends, but processes can still be on their way out when bwrap has exited: wait for them.
        clean = _kill_everything(proc.pid, uids)
    if not clean:
        log.warning("sandbox: processes of program (pid %s, uids %s) survived SIGKILL", proc.pid, uids)
    return proc, timed_out, duration, clean


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


_SIGNAL_HINTS = {
    signal.SIGXCPU: " (CPU time limit)",
    signal.SIGXFSZ: " (file size limit)",
}


def _last_line(text: str) -> str | None:
    """The last line that states an error: a traceback's last line (not indented, not its header). Processes
    of a fork bomb can still be writing tracebacks when they are killed, leaving a header last."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if not line[0].isspace() and not line.startswith("Traceback (most recent call last)"):
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else None


def _judge(res: _Result, limits: Limits) -> Verdict:
    def verdict(passed: bool, status: str, error: str | None) -> Verdict:
        return Verdict(passed, status, error, round(res.duration_s, 4), res.stdout, res.stderr)

    if res.timed_out:
        return verdict(False, "timeout", f"timed out after {limits.timeout_s}s")
    v = res.verdict
    if v is None:  # the harness itself died (its own limits) or never started
        rc = res.returncode
        if rc is not None and rc < 0:
            return verdict(False, "killed", f"killed by {_signal_name(-rc)}{_SIGNAL_HINTS.get(-rc, '')}")
        if rc is not None and rc > 128:  # bwrap reports a signal as 128 + its number
            return verdict(False, "killed", f"killed by {_signal_name(rc - 128)}{_SIGNAL_HINTS.get(rc - 128, '')}")
        return verdict(False, "failed", _last_line(res.stderr) or f"the test harness left no verdict (exit {rc})")
    status = v.get("status")
    if status == "passed":
        return verdict(True, "passed", None)
    if status == "killed" and v.get("signal"):
        sig = v["signal"]
        return verdict(False, "killed", f"killed by {_signal_name(sig)}{_SIGNAL_HINTS.get(sig, '')}")
    error = v.get("error") or None
    code = v.get("exit_code")
    return verdict(False, "failed", error or _last_line(res.stderr) or f"exited with code {code}")


def run_program(program: str | Program, limits: Limits = Limits()) -> Verdict:
    """Run one program in the sandbox. Never raises for anything the program does.

    A ``str`` is a whole program that is its own judge (it passes when it runs to its end); benchmarks pass a
    ``Program`` whose tests run in the trusted harness.
    """
    start = time.monotonic()
    try:
        plan, report = _get_plan()
        if plan is None:
            return Verdict(False, "error", f"sandbox unavailable: {report.get('notes')}", 0.0, "", "")
        if isinstance(program, str):
            program = Program(program)
        return _judge(_execute(program, plan, limits), limits)
    except Exception as exc:  # the sandbox itself failed (no free uid, disk full, preexec failure...)
        log.exception("sandbox: could not run a program")
        return Verdict(False, "error", f"sandbox error: {exc!r}"[:300], round(time.monotonic() - start, 4), "", "")


def run_programs(
    programs: list[str | Program],
    limits: Limits = Limits(),
    workers: int | None = None,
    on_done: Callable[[int, Verdict], None] | None = None,
) -> list[Verdict]:
    """Run programs in parallel worker threads (each program in its own sandbox).

    Results come back in input order; ``on_done(index, verdict)`` is called in the calling thread as each one
    finishes.
    """
    if not programs:
        return []
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    workers = max(1, min(workers, len(programs)))
    _get_plan()  # probe once, here, rather than in the first worker
    results: list[Verdict | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="codetune-sandbox") as pool:
        futures = {pool.submit(run_program, src, limits): i for i, src in enumerate(programs)}
        try:
            for future in as_completed(futures):
                index = futures[future]
                results[index] = future.result()
                if on_done is not None:
                    on_done(index, results[index])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [v for v in results if v is not None]
