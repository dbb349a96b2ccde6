"""The trusted test harness that runs inside the sandbox (standard library only; run as ``python -I -S -c``).

It never executes a line of the candidate's code. At start it forks the *candidate process*, which reads the
candidate's program from stdin, runs it, and then serves calls over two pipes. Only then does the harness read
the tests (from a file descriptor the candidate process closed before running anything) and run them in a
namespace where every top-level name the candidate defined is a proxy (``Handle``). Arguments and results cross
as plain data (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset: exact types);
any other object the candidate returns stays in the candidate process and the harness gets an opaque handle,
equal only to itself. The verdict goes to a descriptor that only the harness holds, tagged with a nonce that
only the harness knows.

argv: TESTS_FD VERDICT_FD CANDIDATE_UID HARNESS_UID (a uid of -1: stay as is).
"""

from __future__ import annotations

import builtins
import json
import os
import select
import sys
import traceback

MAX_MESSAGE = 64 << 20  # bytes of one encoded value
MAX_DEPTH = 200  # nesting of one encoded value

_SEQ = {list: "l", tuple: "t", set: "s", frozenset: "S"}
_SEQ_TYPES = {v: k for k, v in _SEQ.items()}


class Unplain(TypeError):
    """A value that cannot cross between the processes."""


def encode(value, on_other, depth: int = 0):
    """A JSON-able tree for a plain value. ``on_other(obj)`` returns the tree for anything else (or raises)."""
    if depth > MAX_DEPTH:
        raise Unplain("value nested too deeply")
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return ["i", format(value, "x")]  # hex: no int-to-decimal digit limit
    if t is float:
        return ["f", repr(value)]
    if t is complex:
        return ["c", repr(value.real), repr(value.imag)]
    if t is bytes:
        return ["b", value.hex()]
    if t in _SEQ:
        return [_SEQ[t], [encode(v, on_other, depth + 1) for v in value]]
    if t is dict:
        return ["d", [[encode(k, on_other, depth + 1), encode(v, on_other, depth + 1)] for k, v in value.items()]]
    return on_other(value)


def decode(tree, on_handle, depth: int = 0):
    """The plain value of a tree made by ``encode``; raises ValueError/TypeError for anything malformed."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if tree is None or type(tree) is bool or type(tree) is str:
        return tree
    if type(tree) is not list or not tree or type(tree[0]) is not str:
        raise ValueError("malformed value")
    tag = tree[0]
    if tag == "i" and len(tree) == 2 and type(tree[1]) is str:
        return int(tree[1], 16)
    if tag == "f" and len(tree) == 2 and type(tree[1]) is str:
        return float(tree[1])
    if tag == "c" and len(tree) == 3 and type(tree[1]) is str and type(tree[2]) is str:
        return complex(float(tree[1]), float(tree[2]))
    if tag == "b" and len(tree) == 2 and type(tree[1]) is str:
        return bytes.fromhex(tree[1])
    if tag in _SEQ_TYPES and len(tree) == 2 and type(tree[1]) is list:
        return _SEQ_TYPES[tag](decode(v, on_handle, depth + 1) for v in tree[1])
    if tag == "d" and len(tree) == 2 and type(tree[1]) is list:
        out = {}
        for pair in tree[1]:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("malformed dict")
            out[decode(pair[0], on_handle, depth + 1)] = decode(pair[1], on_handle, depth + 1)
        return out
    if tag == "h" and len(tree) == 2 and type(tree[1]) is int:
        return on_handle(tree[1])
    raise ValueError(f"malformed value (tag {tag!r})")


def send(fd: int, obj) -> None:
    data = json.dumps(obj, ensure_ascii=True, allow_nan=False).encode()
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data) :]


def recv(fd: int):
    """One message, or None at end of file."""
    head = _read_exactly(fd, 4)
    if head is None:
        return None
    size = int.from_bytes(head, "big")
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is over the limit")
    body = _read_exactly(fd, size)
    if body is None:
        return None
    return json.loads(body)


def _read_exactly(fd: int, n: int) -> bytes | None:
    parts, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def _set_dumpable(flag: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, flag, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")


def _become(uid: int) -> None:
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


# ------------------------------------------------------------------------------------------------------------
# The candidate process (runs untrusted code; everything it sends is treated as hostile by the harness)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: S110 - the program may have replaced or closed them
            pass


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if type(code) is int:
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except BaseException:  # noqa: S110
        pass
    return 1


def _quit(code=None):
    raise SystemExit(code)


def candidate_main(rfd: int, wfd: int, uid: int) -> None:
    """Never returns: the forked child must not fall back into the harness's code."""
    code = 1
    try:
        _become(uid)
        if uid >= 0:
            _set_dumpable(1)  # setuid() cleared it; the program may read its own /proc/self as usual
        program = json.loads(_read_all(0))
        sys.argv = [""]
        builtins.exit = builtins.quit = _quit  # -S skips the site module, which would have defined them
        ns = {"__name__": "__main__", "__builtins__": builtins}
        exec(compile(program["code"], "<candidate>", "exec"), ns)  # noqa: S102 - sandboxed by design
        if program.get("setup"):
            exec(compile(program["setup"], "<setup>", "exec"), ns)  # noqa: S102
        _flush()
        _serve(rfd, wfd, ns)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:  # noqa: S110
            pass
    finally:
        _flush()
        os._exit(code)


def _serve(rfd: int, wfd: int, ns: dict) -> None:
    import collections
    import types

    objects: dict[int, object] = {}  # handle -> object (kept alive so ids stay unique)
    ids: dict[int, int] = {}  # id(object) -> handle
    # The standard library's dict and tuple flavours cross as the plain dict or tuple they hold (MBPP's
    # references return Counters); what crosses is still a plain value, whatever the class did.
    as_dict = (collections.Counter, collections.OrderedDict, collections.defaultdict)

    def handle(obj) -> list:
        if type(obj) in as_dict:
            return encode(dict.copy(obj), handle)
        if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):  # a namedtuple
            return encode(tuple(tuple.__iter__(obj)), handle)
        key = id(obj)
        if key not in ids:
            ids[key] = len(objects)
            objects[ids[key]] = obj
        return ["h", ids[key]]

    def lookup(hid: int):
        if hid not in objects:
            raise ValueError(f"unknown handle {hid}")
        return objects[hid]

    names = {}
    for name, value in list(ns.items()):
        if name.startswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            names[name] = ["m", value.__name__]
        else:
            names[name] = handle(value)
    send(wfd, ["ready", names])
    while True:
        msg = recv(rfd)
        if msg is None:
            return
        try:
            op, target = msg[0], lookup(msg[1])
            if op == "call":
                args = decode(msg[2], lookup)
                kwargs = decode(msg[3], lookup)
                result = target(*args, **kwargs)
            elif op == "getattr":
                result = getattr(target, msg[2])
            elif op == "iter":
                result = list(target)
            else:
                raise ValueError(f"unknown operation {op!r}")
            reply = ["ok", encode(result, handle)]
        except SystemExit:
            raise
        except BaseException as exc:
            try:
                reply = ["raise", type(exc).__name__, str(exc)[:2000]]
            except BaseException:
                reply = ["raise", "Exception", "unprintable exception"]
        _flush()
        send(wfd, reply)


# ------------------------------------------------------------------------------------------------------------
# The harness


class CandidateGone(Exception):
    """The candidate process ended, or broke the protocol, during a call."""


class RemoteError(Exception):
    """The candidate raised an exception that is not a built-in one."""


class Handle:
    """An object that lives in the candidate process. Equal (and identical) only to itself."""

    __slots__ = ("_id", "_label", "_link")

    def __init__(self, hid: int, label: str, link: Link):
        object.__setattr__(self, "_id", hid)
        object.__setattr__(self, "_label", label)
        object.__setattr__(self, "_link", link)

    def __call__(self, *args, **kwargs):
        return self._link.request("call", self._id, self._link.encode(args), self._link.encode(kwargs))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._link.request("getattr", self._id, name)

    def __iter__(self):
        return iter(self._link.request("iter", self._id))

    def __setattr__(self, name, value):
        raise TypeError("objects of the candidate cannot be modified by the tests")

    def __repr__(self) -> str:
        return f"<candidate object {self._label}>"


class Link:
    def __init__(self, pid: int, rfd: int, wfd: int):
        self.pid, self.rfd, self.wfd = pid, rfd, wfd
        self.handles: dict[int, Handle] = {}
        self.status: int | None = None  # the candidate's wait status once it ended
        try:
            self.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None

    def handle(self, hid: int, label: str = "") -> Handle:
        if hid not in self.handles:
            self.handles[hid] = Handle(hid, label or f"#{hid}", self)
        return self.handles[hid]

    def encode(self, value):
        def other(obj):
            if type(obj) is Handle and obj._link is self:
                return ["h", obj._id]
            raise Unplain(f"a {type(obj).__name__} cannot be passed to the candidate's code (plain data only)")

        return encode(value, other)

    def receive(self):
        """The candidate's next message; None once it ended (its wait status is then in ``status``)."""
        while True:
            watch = [self.rfd] + ([self.pidfd] if self.pidfd is not None else [])
            ready, _, _ = select.select(watch, [], [], None if self.pidfd is not None else 0.05)
            if self.rfd in ready:
                try:
                    msg = recv(self.rfd)
                except (OSError, ValueError) as exc:
                    self.kill()
                    raise CandidateGone(f"the candidate broke the protocol: {exc}") from None
                if msg is not None:
                    return msg
            if self.reap(block=self.rfd in ready):
                return None

    def reap(self, block: bool = False) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            if pid == 0:
                return False
            self.status = status
        return True

    def kill(self) -> None:
        """Best effort only: under bwrap the candidate runs as another uid, which the harness cannot signal.
        Nothing waits for it: when the harness exits, the sandbox's PID namespace ends, and every process in it."""
        if self.status is None:
            try:
                os.kill(self.pid, 9)
            except OSError:
                pass

    def request(self, op: str, hid: int, *args):
        if self.status is not None:
            raise CandidateGone("the candidate process has ended")
        try:
            send(self.wfd, [op, hid, *args])
        except OSError:
            self.reap(block=True)
            raise CandidateGone("the candidate process has ended") from None
        msg = self.receive()
        if msg is None:
            raise CandidateGone("the candidate process ended during a call")
        try:
            if type(msg) is list and msg and msg[0] == "ok" and len(msg) == 2:
                return decode(msg[1], self.handle)
            if type(msg) is list and len(msg) == 3 and msg[0] == "raise":
                name, text = str(msg[1]), str(msg[2])
            else:
                raise ValueError("malformed reply")
        except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
            raise Unplain(f"the candidate returned something that is not plain data: {exc}") from None
        cls = getattr(builtins, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, Warning):
            try:
                raise cls(text)
            except TypeError:  # exception types whose constructor wants other arguments
                pass
        raise RemoteError(f"{name}: {text}")


def _verdict(fd: int, nonce: str, **fields) -> None:
    data = json.dumps({"nonce": nonce, **fields}).encode() + b"\n"
    while data:
        data = data[os.write(fd, data) :]
    os.close(fd)


def _last_line(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()[:300]


def main(argv: list[str]) -> int:
    tests_fd, verdict_fd, candidate_uid, harness_uid = (int(a) for a in argv)
    # Not dumpable before the fork, so the candidate can never trace or read this process; the child undoes it
    # for itself only after it stopped sharing anything with us.
    _set_dumpable(0)
    c_read, c_write = os.pipe()  # candidate -> harness
    h_read, h_write = os.pipe()  # harness -> candidate
    pid = os.fork()
    if pid == 0:
        os.close(tests_fd)
        os.close(verdict_fd)
        os.close(c_read)
        os.close(h_write)
        if candidate_uid < 0:
            _set_dumpable(1)
        candidate_main(h_read, c_write, candidate_uid)
    os.close(0)
    os.close(c_write)
    os.close(h_read)
    _become(harness_uid)
    job = json.loads(_read_all(tests_fd))
    os.close(tests_fd)
    nonce = job["nonce"]
    link = Link(pid, c_read, h_write)

    def ended(before: str) -> dict:
        status = link.status or 0
        if os.WIFSIGNALED(status):
            return {"status": "killed", "signal": os.WTERMSIG(status)}
        code = os.WEXITSTATUS(status)
        if code == 0:
            return {"status": "failed", "error": f"exited with code 0 before {before}"}
        return {"status": "failed", "exit_code": code}

    try:
        ready = link.receive()
    except CandidateGone as exc:
        _verdict(verdict_fd, nonce, status="failed", error=str(exc))
        return 0
    if ready is None:
        _verdict(verdict_fd, nonce, **ended("the tests finished"))
        return 0
    if type(ready) is not list or len(ready) != 2 or ready[0] != "ready" or type(ready[1]) is not dict:
        link.kill()
        _verdict(verdict_fd, nonce, status="failed", error="the candidate broke the protocol")
        return 0

    ns: dict = {"__name__": "__tests__", "__builtins__": builtins}
    for name, ref in ready[1].items():
        if type(name) is not str or type(ref) is not list or len(ref) != 2:
            continue
        if ref[0] == "h" and type(ref[1]) is int:
            ns[name] = link.handle(ref[1], name)
        elif ref[0] == "m" and type(ref[1]) is str and ref[1].partition(".")[0] in sys.stdlib_module_names:
            # a module the candidate imported: the tests get the real one, imported here
            try:
                __import__(ref[1])
                ns[name] = sys.modules[ref[1]]
            except Exception:  # noqa: S110 - a module this interpreter lacks stays undefined for the tests
                pass
    error = None
    try:
        if job.get("prelude"):
            # Benchmark code the tests may call (HumanEval's helpers): the harness runs its own copy, so a
            # candidate that redefines a helper changes only its own code, not the tests'.
            defined: dict = {"__name__": "__tests__", "__builtins__": builtins}
            exec(compile(job["prelude"], "<prelude>", "exec"), defined)  # noqa: S102 - trusted benchmark code
            entry = job.get("entry_point")
            ns.update({k: v for k, v in defined.items() if k != entry and not k.startswith("__")})
        if job.get("tests"):
            exec(compile(job["tests"], "<tests>", "exec"), ns)  # noqa: S102 - trusted benchmark code
    except CandidateGone as exc:
        error = exc
    except BaseException as exc:  # a failed test, a wrong return, a SystemExit in the tests
        traceback.print_exc()
        error = exc
    if error is None:
        verdict = {"status": "passed"}
    elif link.status is not None and (os.WIFSIGNALED(link.status) or os.WEXITSTATUS(link.status) != 0):
        verdict = ended("the tests finished")  # it died during a call: its own exit (signal, traceback) says why
    else:
        verdict = {"status": "failed", "error": _last_line(error)}
    _flush()
    _verdict(verdict_fd, nonce, **verdict)
    link.kill()
    return 0


if __name__ == "__main__":
    main(sys.argv[1:])
    _flush()
    os._exit(0)  # no interpreter teardown: nothing of the candidate is waited for
