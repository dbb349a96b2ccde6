"""The trusted test harness that runs inside the sandbox (standard library only; run as ``python -I -S -c``).

It never executes a line of the candidate's code. At start it forks the *candidate process*, which reads the
candidate's program from stdin, runs it, and then serves calls over two pipes. Only then does the harness read
the tests (from a file descriptor the candidate process closed before running anything) and run them in a
namespace where every top-level name the candidate defined is a proxy (``Handle``). Arguments and results cross
as plain data (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset: exact types);
any other object the candidate returns stays in the candidate process and the harness gets an opaque handle,
equal only to itself. The verdict goes to a descriptor that only the harness holds, tagged with a nonce that
only the harness knows.

argv: TESTS_FD VERDICT_FD CANDIDATE_UID HARNESS_UID WARM_MODULES RLIMITS (a uid of -1: stay as is; modules
comma-separated; limits as resource:soft:hard, comma-separated).
"""

from __future__ import annotations

import builtins
import marshal
import os
import select
import struct
import sys

MAX_MESSAGE = 64 << 20  # bytes of one encoded message
MAX_DEPTH = 200  # nesting of one encoded value

# The wire format (no json: its import, with re's, would be a fifth of a short program's time): one tag byte,
# then fixed-size fields or a 4-byte length / item count.
_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")
_SEQ = {list: b"l", tuple: b"t", set: b"e", frozenset: b"E"}
_SEQ_TYPES = {v[0]: k for k, v in _SEQ.items()}


class Unplain(TypeError):
    """A value that cannot cross between the processes."""


def encode(value, on_other) -> bytes:
    """Bytes for a plain value (exact types only). ``on_other(obj)`` says what to send for anything else:
    ``("h", handle_id)`` or ``("v", plain_value)``; it raises ``Unplain`` to refuse."""
    out: list[bytes] = []
    _encode(value, on_other, out, 0)
    return b"".join(out)


def _encode(v, on_other, out: list, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise Unplain("value nested too deeply")
    t = type(v)
    if v is None:
        out.append(b"N")
    elif t is bool:
        out.append(b"T" if v else b"F")
    elif t is int:
        raw = v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True)
        out += (b"i", _U32.pack(len(raw)), raw)
    elif t is float:
        out += (b"f", _F64.pack(v))
    elif t is complex:
        out += (b"c", _F64.pack(v.real), _F64.pack(v.imag))
    elif t is str:
        raw = v.encode("utf-8", "surrogatepass")
        out += (b"s", _U32.pack(len(raw)), raw)
    elif t is bytes:
        out += (b"b", _U32.pack(len(v)), v)
    elif t in _SEQ:
        items = list(v)
        out += (_SEQ[t], _U32.pack(len(items)))
        for item in items:
            _encode(item, on_other, out, depth + 1)
    elif t is dict:
        pairs = list(v.items())
        out += (b"d", _U32.pack(len(pairs)))
        for key, item in pairs:
            _encode(key, on_other, out, depth + 1)
            _encode(item, on_other, out, depth + 1)
    else:
        kind, what = on_other(v)
        if kind == "h":
            out += (b"h", _U32.pack(what))
        else:
            _encode(what, on_other, out, depth + 1)


def decode(data: bytes, on_handle):
    """The plain value in ``data``; ValueError for anything malformed (TypeError for an unhashable key)."""
    value, pos = _decode(memoryview(data), 0, on_handle, 0)
    if pos != len(data):
        raise ValueError("trailing bytes")
    return value


def _take(buf: memoryview, pos: int, n: int) -> int:
    if pos + n > len(buf):
        raise ValueError("truncated value")
    return pos + n


def _decode(buf: memoryview, pos: int, on_handle, depth: int):
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    end = _take(buf, pos, 1)
    tag = buf[pos]
    pos = end
    if tag == 78:  # N
        return None, pos
    if tag in (84, 70):  # T F
        return tag == 84, pos
    if tag == 102:  # f
        end = _take(buf, pos, 8)
        return _F64.unpack_from(buf, pos)[0], end
    if tag == 99:  # c
        end = _take(buf, pos, 16)
        return complex(_F64.unpack_from(buf, pos)[0], _F64.unpack_from(buf, pos + 8)[0]), end
    n = _U32.unpack_from(buf, pos)[0] if pos + 4 <= len(buf) else -1
    if n < 0:
        raise ValueError("truncated value")
    pos += 4
    if tag == 104:  # h
        return on_handle(n), pos
    if tag in (105, 115, 98):  # i s b
        end = _take(buf, pos, n)
        raw = buf[pos:end]
        if tag == 105:
            return int.from_bytes(raw, "big", signed=True), end
        if tag == 115:
            return str(raw, "utf-8", "surrogatepass"), end
        return bytes(raw), end
    if tag in _SEQ_TYPES:
        items = []
        for _ in range(n):  # every item takes at least one byte: a huge count runs out of data quickly
            item, pos = _decode(buf, pos, on_handle, depth + 1)
            items.append(item)
        return _SEQ_TYPES[tag](items), pos
    if tag == 100:  # d
        out = {}
        for _ in range(n):
            key, pos = _decode(buf, pos, on_handle, depth + 1)
            out[key], pos = _decode(buf, pos, on_handle, depth + 1)
        return out, pos
    raise ValueError(f"unknown tag {tag}")


def send(fd: int, message: tuple, on_other) -> None:
    data = encode(message, on_other)
    data = _U32.pack(len(data)) + data
    while data:
        data = data[os.write(fd, data) :]


def recv_raw(fd: int) -> bytes | None:
    """One message's bytes, or None at end of file."""
    head = _read_exactly(fd, 4)
    if head is None:
        return None
    size = _U32.unpack(head)[0]
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is over the limit")
    return _read_exactly(fd, size)


def recv(fd: int, on_handle):
    """One decoded message, or None at end of file."""
    body = recv_raw(fd)
    return None if body is None else decode(body, on_handle)


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


def _suid_dumpable() -> int:
    try:
        with open("/proc/sys/fs/suid_dumpable", "rb") as f:
            return int(f.read().strip() or 1)
    except (OSError, ValueError):
        return 1


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
        program = marshal.loads(_read_all(0))  # written by codetune, not by the candidate
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
            import traceback  # only now: an import costs every program's start

            traceback.print_exc()
        except BaseException:  # noqa: S110
            pass
    finally:
        _flush()
        os._exit(code)


class _Ref:
    """Send this object as a handle, whatever it is."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj


def _serve(rfd: int, wfd: int, ns: dict) -> None:
    import collections
    import types

    objects: dict[int, object] = {}  # handle -> object (kept alive so ids stay unique)
    ids: dict[int, int] = {}  # id(object) -> handle
    # The standard library's dict and tuple flavours cross as the plain dict or tuple they hold (MBPP's
    # references return Counters); what crosses is still a plain value, whatever the class did.
    as_dict = (collections.Counter, collections.OrderedDict, collections.defaultdict)

    def other(obj) -> tuple:
        if type(obj) is _Ref:
            obj = obj.obj
        elif type(obj) in as_dict:
            return "v", dict.copy(obj)
        elif isinstance(obj, tuple) and hasattr(type(obj), "_fields"):  # a namedtuple
            return "v", tuple(tuple.__iter__(obj))
        key = id(obj)
        if key not in ids:
            ids[key] = len(objects)
            objects[ids[key]] = obj
        return "h", ids[key]

    def lookup(hid: int):
        if hid not in objects:
            raise ValueError(f"unknown handle {hid}")
        return objects[hid]

    names = {}
    for name, value in list(ns.items()):
        if not name.startswith("__"):
            names[name] = ("m", value.__name__) if isinstance(value, types.ModuleType) else _Ref(value)
    send(wfd, ("ready", names), other)
    while True:
        msg = recv(rfd, lookup)
        if msg is None:
            return
        try:
            op, target = msg[0], lookup(msg[1])
            if op == "call":
                result = target(*msg[2], **msg[3])
            elif op == "getattr":
                result = getattr(target, msg[2])
            elif op == "iter":
                result = list(target)
            else:
                raise ValueError(f"unknown operation {op!r}")
            reply = encode(("ok", result), other)
        except SystemExit:
            raise
        except BaseException as exc:
            try:
                reply = encode(("raise", type(exc).__name__, str(exc)[:2000]), other)
            except BaseException:
                reply = encode(("raise", "Exception", "unprintable exception"), other)
        _flush()
        reply = _U32.pack(len(reply)) + reply
        while reply:
            reply = reply[os.write(wfd, reply) :]


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
        return self._link.request(("call", self._id, args, kwargs))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._link.request(("getattr", self._id, name))

    def __iter__(self):
        return iter(self._link.request(("iter", self._id)))

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

    def _other(self, obj) -> tuple:
        if type(obj) is Handle and obj._link is self:
            return "h", obj._id
        raise Unplain(f"a {type(obj).__name__} cannot be passed to the candidate's code (plain data only)")

    def receive(self):
        """The candidate's next message, decoded to plain data; None once it ended (its wait status is then in
        ``status``). A malformed message raises Unplain: it fails the call, and the next message is read
        from its own length prefix."""
        while True:
            watch = [self.rfd] + ([self.pidfd] if self.pidfd is not None else [])
            ready, _, _ = select.select(watch, [], [], None if self.pidfd is not None else 0.05)
            if self.rfd in ready:
                try:
                    body = recv_raw(self.rfd)
                except (OSError, ValueError) as exc:
                    self.kill()
                    raise CandidateGone(f"the candidate broke the protocol: {exc}") from None
                if body is not None:
                    try:
                        return decode(body, self.handle)
                    except Exception as exc:  # whatever went wrong decoding it, it is not plain data
                        raise Unplain(f"the candidate sent something that is not plain data: {exc}") from None
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

    def request(self, message: tuple):
        if self.status is not None:
            raise CandidateGone("the candidate process has ended")
        data = encode(message, self._other)  # Unplain for a test's non-plain argument: that call fails
        try:
            os.write(self.wfd, _U32.pack(len(data)))
            while data:
                data = data[os.write(self.wfd, data) :]
        except OSError:
            self.reap(block=True)
            raise CandidateGone("the candidate process has ended") from None
        msg = self.receive()
        if msg is None:
            raise CandidateGone("the candidate process ended during a call")
        if type(msg) is tuple and len(msg) == 2 and msg[0] == "ok":
            return msg[1]
        if not (type(msg) is tuple and len(msg) == 3 and msg[0] == "raise" and type(msg[1]) is type(msg[2]) is str):
            raise Unplain("the candidate sent a malformed reply")
        name, text = msg[1], msg[2]
        cls = getattr(builtins, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, Warning):
            try:
                raise cls(text)
            except TypeError:  # exception types whose constructor wants other arguments
                pass
        raise RemoteError(f"{name}: {text}")


def _verdict(fd: int, nonce: str, status: str, error: str = "", signal: int = 0, exit_code: int = 0) -> None:
    """One line: nonce, status, signal, exit code, error (tab-separated; the error last, tabs and lines out)."""
    error = " ".join(str(error).split())[:500]
    data = f"{nonce}\t{status}\t{signal}\t{exit_code}\t{error}\n".encode("utf-8", "replace")
    while data:
        data = data[os.write(fd, data) :]
    os.close(fd)


def _last_line(exc: BaseException) -> str:
    import traceback

    return traceback.format_exception_only(type(exc), exc)[-1].strip()[:300]


def main(argv: list[str]) -> int:
    tests_fd, verdict_fd, candidate_uid, harness_uid = (int(a) for a in argv[:4])
    _set_limits(argv[5])
    _import_warm(argv[4])
    pid, c_read, h_write = _start_candidate(tests_fd, verdict_fd, candidate_uid, harness_uid)
    if "random" in sys.modules:  # not the candidate's random sequence: the tests' random inputs stay unknown
        sys.modules["random"].seed()
    job = marshal.loads(_read_all(tests_fd))  # written by codetune, never seen by the candidate
    os.close(tests_fd)
    nonce = job["nonce"]
    link = Link(pid, c_read, h_write)
    names = _await_ready(link, verdict_fd, nonce)
    if names is None:
        return 0
    verdict = _run_tests(job, _test_namespace(names), link)
    _flush()
    _verdict(verdict_fd, nonce, **verdict)
    link.kill()
    return 0


def _set_limits(specs: str) -> None:
    """Resource limits as resource:soft:hard, comma-separated: set before the fork, so both processes have them."""
    if specs:
        import resource

        for spec in specs.split(","):
            which, soft, hard = (int(x) for x in spec.split(":"))
            resource.setrlimit(which, (soft, hard))


def _import_warm(modules: str) -> None:
    for module in filter(None, modules.split(",")):
        # Modules the tests or the prelude import, named by codetune: imported once, before the fork, so the
        # two processes do not each pay for them.
        try:
            __import__(module)
        except Exception:  # noqa: S110 - the tests will raise it themselves
            pass


def _start_candidate(tests_fd: int, verdict_fd: int, candidate_uid: int, harness_uid: int) -> tuple[int, int, int]:
    """Fork the candidate process, then become the harness's uid: (its pid, the pipe from it, the pipe to it)."""
    same_uid = candidate_uid < 0 or candidate_uid == harness_uid
    if same_uid:
        # Not dumpable before the fork, so the candidate (same uid) can never trace or read this process; the
        # child undoes it for itself. With two uids the kernel already forbids it, and ctypes is not imported.
        _set_dumpable(0)
    c_read, c_write = os.pipe()  # candidate -> harness
    h_read, h_write = os.pipe()  # harness -> candidate
    pid = os.fork()
    if pid == 0:
        os.close(tests_fd)
        os.close(verdict_fd)
        os.close(c_read)
        os.close(h_write)
        if same_uid:
            _set_dumpable(1)
        candidate_main(h_read, c_write, candidate_uid)
    os.close(0)
    os.close(c_write)
    os.close(h_read)
    _become(harness_uid)
    if not same_uid and _suid_dumpable() != 0:
        # setuid() made this process non-dumpable only if fs.suid_dumpable is 0 (the usual setting); the other
        # uid already keeps the candidate out, this is the second lock.
        _set_dumpable(0)
    return pid, c_read, h_write


def _ended(link: Link, before: str) -> dict:
    """The verdict for a candidate process that has ended, from its wait status."""
    status = link.status or 0
    if os.WIFSIGNALED(status):
        return {"status": "killed", "signal": os.WTERMSIG(status)}
    code = os.WEXITSTATUS(status)
    if code == 0:
        return {"status": "failed", "error": f"exited with code 0 before {before}"}
    return {"status": "failed", "exit_code": code}


def _await_ready(link: Link, verdict_fd: int, nonce: str) -> dict | None:
    """The candidate's top-level names, once its program has run; None when it did not get that far (the
    verdict is then written)."""
    try:
        ready = link.receive()
    except CandidateGone as exc:
        _verdict(verdict_fd, nonce, status="failed", error=str(exc))
        return None
    except Unplain:
        ready = ()
    if ready is None:
        _verdict(verdict_fd, nonce, **_ended(link, "the tests finished"))
        return None
    if type(ready) is not tuple or len(ready) != 2 or ready[0] != "ready" or type(ready[1]) is not dict:
        link.kill()
        _verdict(verdict_fd, nonce, status="failed", error="the candidate broke the protocol")
        return None
    return ready[1]


def _test_namespace(names: dict) -> dict:
    """The tests' globals: a proxy for each of the candidate's names, the real module for each it imported."""
    ns: dict = {"__name__": "__tests__", "__builtins__": builtins}
    for name, ref in names.items():
        if type(name) is not str:
            continue
        if type(ref) is Handle:
            object.__setattr__(ref, "_label", name)
            ns[name] = ref
        elif (
            type(ref) is tuple
            and len(ref) == 2
            and ref[0] == "m"
            and type(ref[1]) is str
            and ref[1].partition(".")[0] in sys.stdlib_module_names
        ):
            # a module the candidate imported: the tests get the real one, imported here
            try:
                __import__(ref[1])
                ns[name] = sys.modules[ref[1]]
            except Exception:  # noqa: S110 - a module this interpreter lacks stays undefined for the tests
                pass
    return ns


def _run_tests(job: dict, ns: dict, link: Link) -> dict:
    """Run the prelude and the tests in ``ns``; the verdict."""
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
        import traceback

        traceback.print_exc()
        error = exc
    if error is None:
        return {"status": "passed"}
    if link.status is not None and (os.WIFSIGNALED(link.status) or os.WEXITSTATUS(link.status) != 0):
        return _ended(link, "the tests finished")  # it died during a call: its own exit (signal, traceback) says why
    return {"status": "failed", "error": _last_line(error)}


def entry() -> None:
    main(sys.argv[1:])
    _flush()
    os._exit(0)  # no interpreter teardown: nothing of the candidate is waited for


if __name__ == "__main__":
    entry()
