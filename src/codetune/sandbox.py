"""Run untrusted, model-written Python programs in a sandboxed subprocess and decide pass/fail.

Each program is a complete Python source (candidate solution followed by its tests). It runs in its own
process, session and temporary working directory, with a scrubbed environment and resource limits; when the
caller is root it also gets a fresh network namespace and a dedicated unprivileged uid. A program passes only
when it exits with status 0 *and* a per-run random marker, printed by a line the harness appends after the
tests, reached stdout: leaving early with ``exit(0)`` / ``os._exit(0)`` is a failure.

What is and is not isolated is documented in docs/sandbox.md; ``isolation_report()`` says what this machine
and user actually get.
"""

from __future__ import annotations

import ctypes
import fcntl
import grp
import json
import logging
import os
import pwd
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

__all__ = ["Limits", "Verdict", "isolation_report", "run_program", "run_programs", "UID_BASE", "UID_COUNT"]

log = logging.getLogger(__name__)

# Dedicated sandbox uids (gid == uid); one per running program, never one that has a passwd/group entry.
UID_BASE = 61000
UID_COUNT = 1000

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38

# Everything the program sees of the environment (HOME and TMPDIR are its working directory). Note that -I
# makes the interpreter ignore PYTHON* variables, so PYTHONHASHSEED=0 is inert: str hashing stays randomized.
_BASE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
# -I: isolated mode (ignores PYTHON* variables such as PYTHONOPTIMIZE, no user site, no cwd on sys.path);
# -B: no .pyc files; "-": the program comes from stdin, read to EOF and compiled before it runs.
# Never -O: asserts are the tests.
_PY_FLAGS = ["-I", "-B", "-"]
# Top-level entries in these world-writable directories that a sandbox uid leaves behind are removed.
_SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock; the whole process tree is killed at the limit
    cpu_s: int = 10  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE (also caps captured stdout/stderr)
    processes: int = 32  # RLIMIT_NPROC (only meaningful under a dedicated uid)
    output_bytes: int = 4096  # how much of stdout/stderr tail is kept in the Verdict


@dataclass
class Verdict:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "killed" | "error"
    error: str | None
    duration_s: float
    stdout: str
    stderr: str


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


def _uids_with_processes() -> set[int]:
    """Every uid that owns a process, zombies included (they still count against RLIMIT_NPROC)."""
    return {u for p in _procs() for u in p.uids}


def _live_pids_of_uid(uid: int) -> list[int]:
    return [p.pid for p in _procs() if p.alive and uid in p.uids]


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
        stack = [leader]
        while stack:
            pid = stack.pop()
            for child in children.get(pid, ()):
                if child not in found and child in alive:
                    found.add(child)
                    stack.append(child)
    found.discard(me)
    return sorted(found)


def _kill_everything(leader: int, uid: int | None, grace_s: float = 5.0) -> bool:
    """SIGKILL the program's whole process tree; True once nothing of it is left running.

    Under a dedicated uid every process of that uid is the program's, including ones that left the process
    group with setsid(); RLIMIT_NPROC caps how many there can be, so repeated sweeps converge. Without one,
    only the session, the process group and descendants still attached to the leader can be found: they are
    SIGSTOPped first (a stopped process cannot fork, and the leader stays alive so the tree stays connected),
    then killed.
    """
    stopped: set[int] = set()
    if uid is None:
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
        if uid is not None:
            victims = _live_pids_of_uid(uid)
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
# Dedicated uids: one per running program, exclusive across threads (a set) and across processes (flock).

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
    def __init__(self) -> None:
        self.uid, self._lock_fd = self._acquire()

    @staticmethod
    def _acquire() -> tuple[int, int | None]:
        with _uid_mutex:
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

    def release(self) -> None:
        _remove_files_of_uid(self.uid)
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
                st = entry.stat(follow_symlinks=False)
                if st.st_uid != uid:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------------------------
# The isolation plan: chosen once per process by actually running a probe under each candidate setup.


@dataclass(frozen=True)
class _Plan:
    interpreter: str
    drop_uid: bool
    net: str  # "netns": unshare(CLONE_NEWNET) as root; "userns": unshare(CLONE_NEWUSER|CLONE_NEWNET); "none"


_NET_METHOD = {
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
try:
    os.listdir({home!r})
    home = True
except OSError:
    home = False
print(json.dumps({{"uid": os.getuid(), "ifaces": ifaces, "home": home, "version": sys.version.split()[0]}}))
"""


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


def _probe(plan: _Plan, home: str) -> tuple[dict | None, str]:
    marker = f"codetune-probe-{secrets.token_hex(8)}"
    try:
        res = _execute(_PROBE.format(home=home) + _suffix(marker), plan, Limits(timeout_s=20.0), marker)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return None, f"{plan.interpreter}: {exc}"
    if res.timed_out or res.returncode != 0 or not res.marker_seen:
        why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        return None, f"{plan.interpreter}: {why}"
    try:
        info = json.loads(res.stdout.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None, f"{plan.interpreter}: unreadable probe output"
    if plan.drop_uid and not UID_BASE <= info["uid"] < UID_BASE + UID_COUNT:
        return None, f"{plan.interpreter}: still uid {info['uid']}"
    if plan.net != "none" and info["ifaces"] != ["lo"]:
        return None, f"{plan.interpreter}: {plan.net} left interfaces {info['ifaces']}"
    return info, ""


def _choose_plan() -> tuple[_Plan | None, dict[str, bool | str]]:
    root = os.geteuid() == 0
    home = _parent_home()
    # Strongest first. Running untrusted code as root (root that cannot setuid) is a last resort, reported.
    options = [(True, "netns"), (True, "userns"), (True, "none"), (False, "netns")] if root else []
    options += [(False, "userns"), (False, "none")]
    notes: list[str] = []
    for drop_uid, net in options:
        for interpreter in _interpreter_candidates():
            plan = _Plan(interpreter, drop_uid, net)
            info, why = _probe(plan, home)
            if info is None:
                notes.append(f"[uid={'dedicated' if drop_uid else 'same'}, net={net}] {why}")
                continue
            if root and not drop_uid:
                log.warning("sandbox: running as root and cannot drop to a dedicated uid; programs run as root")
            return plan, _report(root, home, plan, info, notes)
    return None, _report(root, home, None, None, ["no interpreter could be run in the sandbox", *notes])


def _report(root: bool, home: str, plan: _Plan | None, info: dict | None, notes: list[str]) -> dict[str, bool | str]:
    drop = plan is not None and plan.drop_uid
    net = plan.net if plan is not None else "none"
    return {
        "available": plan is not None,
        "root": root,
        "separate_uid": drop,  # a dedicated unprivileged uid/gid per running program, no supplementary groups
        "uid_range": f"{UID_BASE}-{UID_BASE + UID_COUNT - 1}" if drop else "",
        "network_namespace": net != "none",
        "network_method": _NET_METHOD[net],
        "rlimit_nproc_effective": drop,  # per-program uid: a fork bomb hits the limit, nothing else shares it
        "kill_by_uid": drop,  # leftovers (setsid() daemons too) are found and killed by uid
        "can_signal_parent": not drop,
        "parent_home": home,
        "parent_home_readable": bool(info["home"]) if info else False,
        "no_new_privs": _PRCTL is not None,
        "seccomp": False,
        "filesystem_isolated": False,  # only file permissions; /tmp, /var/tmp, /dev/shm stay writable
        "interpreter": plan.interpreter if plan else "",
        "python_version": str(info["version"]) if info else "",
        "source_via": "stdin",
        "notes": "; ".join(notes),
    }


def _get_plan() -> tuple[_Plan | None, dict[str, bool | str]]:
    global _plan_cache
    with _plan_mutex:
        if _plan_cache is None:
            _plan_cache = _choose_plan()
        return _plan_cache


def isolation_report() -> dict[str, bool | str]:
    """What this machine and user actually get (probed once per process by running a program)."""
    return dict(_get_plan()[1])


# --------------------------------------------------------------------------------------------------------------
# Running one program


@dataclass
class _Result:
    returncode: int | None
    timed_out: bool
    duration_s: float
    marker_seen: bool
    stdout: str
    stderr: str
    clean: bool


def _suffix(marker: str) -> str:
    """Appended after the program: reached only if every statement above ran (the marker is os.write()n to fd 1,
    so a program that replaced sys.stdout or print still passes)."""
    return (
        "\n\n# ---- codetune sandbox: end of the tests ----\n"
        "try:\n"
        "    __import__('sys').stdout.flush()\n"
        "except BaseException:\n"
        "    pass\n"
        f"__import__('os').write(1, b'\\n{marker}\\n')\n"
    )


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

    def preexec() -> None:  # runs in the child between fork and exec; stdout/stderr are already the files
        try:
            for res, soft, hard in rlimits:
                resource.setrlimit(res, (soft, hard))
            if plan.net == "netns":
                _unshare(_CLONE_NEWNET)  # needs root: before dropping privileges
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)  # as root this sets real, effective and saved uid
            if plan.net == "userns":
                me, my_gid = os.getuid(), os.getgid()
                if uid is not None and _PRCTL is not None:
                    _prctl(_PR_SET_DUMPABLE, 1)  # setuid() made /proc/self root-owned: the maps need it back
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


def _contains(fd: int, needle: bytes) -> bool:
    offset, carry, chunk = 0, b"", 1 << 20
    while True:
        data = os.pread(fd, chunk, offset)
        if not data:
            return False
        if needle in carry + data:
            return True
        carry = (carry + data)[-(len(needle) - 1) :]
        offset += len(data)


def _force_rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    # Without root, a program can leave directories it made unreadable (chmod 000): open them up and retry.
    stack = [path]
    while stack:
        p = stack.pop()
        try:
            if not stat.S_ISDIR(os.lstat(p).st_mode):
                continue
            os.chmod(p, 0o700)
            stack.extend(os.path.join(p, name) for name in os.listdir(p))
        except OSError:
            continue
    shutil.rmtree(path, ignore_errors=True)


def _execute(source: str, plan: _Plan, limits: Limits, marker: str) -> _Result:
    lease = _UidLease() if plan.drop_uid else None
    uid = lease.uid if lease is not None else None
    run_dir = tempfile.mkdtemp(prefix="codetune-sandbox-", dir=_private_tmp_base())
    fds: list[int] = []
    try:
        os.chmod(run_dir, 0o711)  # the sandbox uid may traverse it (to reach work/) but not list it
        work = os.path.join(run_dir, "work")
        os.mkdir(work, 0o700)
        if uid is not None:
            os.chown(work, uid, uid)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        out_fd = os.open(os.path.join(run_dir, "stdout"), flags, 0o600)
        fds.append(out_fd)
        err_fd = os.open(os.path.join(run_dir, "stderr"), flags, 0o600)
        fds.append(err_fd)
        env = dict(_BASE_ENV, HOME=work, TMPDIR=work)
        preexec = _make_preexec(plan, uid, _rlimits(limits, uid is not None))

        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [plan.interpreter, *_PY_FLAGS],
                stdin=subprocess.PIPE,
                stdout=out_fd,
                stderr=err_fd,
                cwd=work,
                env=env,
                start_new_session=True,
                close_fds=True,
                umask=0o077,
                preexec_fn=preexec,
            )
        except subprocess.SubprocessError as exc:  # preexec_fn failed; it wrote why to the stderr file
            raise RuntimeError(_last_line(_tail(err_fd, 1000).decode("utf-8", "replace")) or str(exc)) from exc
        timed_out = False
        try:
            try:
                # Python reads stdin to EOF and compiles the whole program before running any of it; after
                # that the program's stdin is an empty, closed pipe.
                proc.communicate(source.encode("utf-8", "replace"), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            if proc.poll() is None:
                _kill_everything(proc.pid, uid)
                proc.wait()
            duration = time.monotonic() - start
            clean = _kill_everything(proc.pid, uid)  # daemons, setsid() escapees, fork-bomb leftovers
        if not clean:
            log.warning("sandbox: processes of program (pid %s, uid %s) survived SIGKILL", proc.pid, uid)

        needle = marker.encode()
        seen = _contains(out_fd, needle)
        out = _tail(out_fd, limits.output_bytes + len(needle) + 2).replace(b"\n" + needle + b"\n", b"")
        out = out[-limits.output_bytes :] if limits.output_bytes > 0 else b""
        err = _tail(err_fd, limits.output_bytes) if limits.output_bytes > 0 else b""
        return _Result(
            returncode=proc.returncode,
            timed_out=timed_out,
            duration_s=duration,
            marker_seen=seen,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            clean=clean,
        )
    finally:
        for fd in fds:
            os.close(fd)
        _force_rmtree(run_dir)
        if lease is not None:
            lease.release()


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
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else None


def _judge(res: _Result, limits: Limits) -> Verdict:
    def verdict(passed: bool, status: str, error: str | None) -> Verdict:
        return Verdict(passed, status, error, round(res.duration_s, 4), res.stdout, res.stderr)

    rc = res.returncode
    if res.timed_out:
        return verdict(False, "timeout", f"timed out after {limits.timeout_s}s")
    if rc is not None and rc < 0:
        return verdict(False, "killed", f"killed by {_signal_name(-rc)}{_SIGNAL_HINTS.get(-rc, '')}")
    if rc != 0:
        return verdict(False, "failed", _last_line(res.stderr) or f"exited with code {rc}")
    if not res.marker_seen:
        return verdict(False, "failed", "exited with code 0 before the tests finished")
    return verdict(True, "passed", None)


def run_program(source: str, limits: Limits = Limits()) -> Verdict:
    """Run one program (solution + tests) in the sandbox. Never raises for anything the program does."""
    start = time.monotonic()
    try:
        plan, report = _get_plan()
        if plan is None:
            return Verdict(False, "error", f"sandbox unavailable: {report.get('notes')}", 0.0, "", "")
        marker = f"codetune-tests-done-{secrets.token_hex(16)}"
        return _judge(_execute(source + _suffix(marker), plan, limits, marker), limits)
    except Exception as exc:  # the sandbox itself failed (no free uid, disk full, preexec failure...)
        log.exception("sandbox: could not run a program")
        return Verdict(False, "error", f"sandbox error: {exc!r}"[:300], round(time.monotonic() - start, 4), "", "")


def run_programs(
    sources: list[str],
    limits: Limits = Limits(),
    workers: int | None = None,
    on_done: Callable[[int, Verdict], None] | None = None,
) -> list[Verdict]:
    """Run programs in parallel worker threads (each program in its own sandboxed process).

    Results come back in input order; ``on_done(index, verdict)`` is called in the calling thread as each one
    finishes.
    """
    if not sources:
        return []
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    workers = max(1, min(workers, len(sources)))
    _get_plan()  # probe once, here, rather than in the first worker
    results: list[Verdict | None] = [None] * len(sources)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="codetune-sandbox") as pool:
        futures = {pool.submit(run_program, src, limits): i for i, src in enumerate(sources)}
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
