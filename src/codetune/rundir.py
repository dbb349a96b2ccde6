"""Run directories and safe writes: the one place that decides where codetune may write.

Rules every command that writes follows (merge, export, eval, prepare, train, card, generate):

- A folder is built in a fresh staging folder created next to its target (``mkdtemp``: new,
  exclusive, mode 0700) and renamed into place at the end, so a failure leaves nothing half-written
  and nothing that another user planted is ever written through.
- A marker file, ``.codetune.json`` (``kind`` and ``version``), says that codetune made a folder.
- An existing target is refused unless ``overwrite``; even then it is replaced only when it is a
  codetune output of the same kind. A symbolic link is never a target.
- A target that contains the source run or the current directory (``--out RUN``, ``--out .``,
  ``--out ..``) is always refused.
- Single files inside folders codetune owns are written through a new temporary file
  (``mkstemp``, O_EXCL) renamed over the name, which replaces a planted link instead of following it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, OutputError, RecipeError
from .runfiles import read_adapter_config, read_eval_summary, read_metrics, read_train_summary
from .version import __version__

MARKER = ".codetune.json"
MARKER_VERSION = 1
# File names of a run directory and of the folders codetune writes: spelled here and nowhere else.
RECIPE_FILE = "recipe.yaml"  # a run's resolved recipe
MERGED_RECIPE = "codetune_recipe.yaml"  # in merged/: its run's recipe (generation and evaluation settings)
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: a folder holding it is an adapter
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's adapter weights
EVAL_SUMMARY = "summary.json"  # in eval/ (and any --out of eval)
MERGE_RECORD = "codetune_merge.json"  # in merged/: the adapter it was merged from
HELDOUT_RECORD = "codetune_heldout.json"  # in merged/: the task ids its run trained on


# ---------------------------------------------------------------------------------------
# Markers


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder codetune made, or None (no marker, a link, not JSON)."""
    try:
        fd = os.open(Path(folder) / MARKER, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(65536)
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("kind"), str) else None


def is_kind(folder: Path, kind: str) -> bool:
    folder = Path(folder)
    return folder.is_dir() and not folder.is_symlink() and (read_marker(folder) or {}).get("kind") == kind


def marker_text(kind: str, **extra) -> str:
    return json.dumps({"kind": kind, "version": MARKER_VERSION, "codetune": __version__, **extra}, indent=2) + "\n"


# ---------------------------------------------------------------------------------------
# Writing files and folders

# The file system refused a write: full, over quota, a file too large, read-only
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class WriteFailed(OutputError):
    """A write the file system refused, naming what was being written (``reason``: the file system's words)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, when ``exc`` says the file system refused it (a full disk, say), in the words of
    the library that wrote: an OSError, safetensors' SafetensorError, torch's writer. None otherwise (a
    read error, a bug): those are not a write to name."""
    if isinstance(exc, WriteFailed):  # a file inside a staging folder: the folder's target is what to name
        return exc.reason
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) if exc.errno in _WRITE_ERRNOS else None
    text = " ".join(str(exc).split())
    if type(exc).__name__ == "SafetensorError" and text.startswith("Error while serializing"):
        return text.split("I/O error: ", 1)[-1]
    if isinstance(exc, RuntimeError) and "PytorchStreamWriter failed writing file" in text:
        return "the file system refused the write (" + text.rsplit(": ", 1)[-1] + ")"
    return None


def _refuse_failed_write(exc: BaseException, target: Path, what: str) -> None:
    """Turn a refused write into one error naming ``target`` (the CLI would otherwise print "No space left
    on device" alone, or a library's traceback)."""
    reason = write_failure(exc)
    if reason is not None:
        raise WriteFailed(
            f"cannot write {what} {target}: {reason}; nothing was replaced (free some space, or choose another place)",
            reason,
        ) from None


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644) -> Path:
    """Write ``path`` through a new temporary file beside it, renamed over the name at the end.

    The temporary file is created exclusively (``mkstemp``), so a link planted under a predictable
    name is never followed, and ``os.replace`` replaces a link at ``path`` rather than its target.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _refuse_failed_write(exc, path, "file")
        raise
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A new temporary file name beside ``path`` for a library that writes by name (savefig);
    renamed over ``path`` when the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_line(path: Path, line: str) -> None:
    """Append to a log file without following a link at its name."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(line)
    except OSError as exc:
        _refuse_failed_write(exc, path, "file")
        raise


def remove_tree(path: Path) -> bool:
    """Delete a folder codetune made; a tree too deep or odd to delete is left (and False returned)
    rather than crashing the command that already did its work."""
    try:
        shutil.rmtree(path)
        return True
    except FileNotFoundError:
        return True
    except (OSError, RecursionError, MemoryError):
        return False


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or inner.is_relative_to(outer)


def check_target(
    target: Path,
    kind: str,
    *,
    overwrite: bool = False,
    protect: Sequence[Path] = (),
    ours: Callable[[Path], bool] | None = None,
    what: str = "output",
    elsewhere: str | None = "choose a new path",
) -> None:
    """Refuse a write to ``target`` that could lose data; see the module's rules. ``elsewhere``: how this
    command writes to another place (``choose another --out``), None when it has no such option."""
    target = Path(target)
    other = f"; {elsewhere}" if elsewhere else ""
    resolved = target.resolve()
    guarded = [(Path.cwd().resolve(), "the current directory")]
    guarded += [(Path(p).resolve(), str(p)) for p in protect if p is not None]
    for path, name in guarded:
        if _contains(resolved, path):
            raise OutputError(
                f"{what} {target} contains {name}: codetune never writes over a folder that holds its "
                f"source or the current directory{other}"
            )
    if target.is_symlink():
        raise OutputError(
            f"{what} {target} is a symbolic link: codetune never writes through one{other or '; remove the link'}"
        )
    if target.exists():
        if not overwrite:
            raise OutputError(
                f"{what} {target} already exists: pass --overwrite to replace it (only a codetune {kind} output "
                f"is replaced){other.replace(';', ', or', 1)}"
            )
        if not (ours(target) if ours is not None else is_kind(target, kind)):
            why = f"no {MARKER} of that kind" if target.is_dir() else "a file codetune did not write"
            raise OutputError(
                f"{what} {target} exists and is not a codetune {kind} output ({why}): "
                f"codetune will not replace it, even with --overwrite{other or '; move it away first'}"
            )


# A staging folder's name says which process made it: .<target>.pid<PID>-<HOST>.<random>.staging
_STAGING_NAME = re.compile(r"^\..+\.pid(?P<pid>[0-9]+)-(?P<host>[0-9a-f]{8})\.[^.]+\.staging$")


def _host_tag() -> str:
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a number no process has: not ours to judge
    return True


def sweep_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging folders in ``folder`` left by codetune processes that died mid-write (SIGKILL, a
    power cut): named by a process of this machine that no longer runs, owned by this user, a real folder.
    Anything else (a live process's, another machine's, a name codetune does not write) stays."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host, uid = _host_tag(), os.geteuid()
    for entry in entries:
        match = _STAGING_NAME.match(entry.name)
        if match is None or match["host"] != host or _process_alive(int(match["pid"])):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != uid:
                continue
        except OSError:
            continue
        if remove_tree(Path(entry.path)):
            removed.append(Path(entry.path))
    return removed


def _staging_folder(target: Path, what: str) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_staging(target.parent)
        prefix = f".{target.name}.pid{os.getpid()}-{_host_tag()}."
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=".staging", dir=target.parent))
    except OSError as exc:
        raise OutputError(f"cannot write {what} {target}: {exc.strerror}; choose a writable place") from None


def _move_into_place(staging: Path, target: Path, recheck: Callable[[], None], what: str) -> None:
    recheck()  # the target may have appeared while the command ran
    old = None
    if target.exists() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(6)}")
        os.rename(target, old)
    try:
        os.replace(staging, target) if staging.is_file() else os.rename(staging, target)
    except OSError as exc:
        if old is not None:
            os.rename(old, target)
        raise OutputError(
            f"cannot move the finished {what} into {target}: {exc.strerror}; nothing was replaced"
        ) from None
    if old is not None:
        remove_tree(old) if old.is_dir() else old.unlink(missing_ok=True)


@contextmanager
def staged_dir(
    target: Path,
    kind: str,
    *,
    overwrite: bool = False,
    protect: Sequence[Path] = (),
    ours: Callable[[Path], bool] | None = None,
    what: str = "output folder",
    meta: dict | None = None,
    elsewhere: str | None = "choose a new path",
) -> Iterator[Path]:
    """Build the folder ``target`` in a fresh staging folder beside it; on success it gets the
    marker and is renamed into place (replacing an earlier codetune output of the same kind only
    with ``overwrite``). On failure the staging folder goes and ``target`` is untouched."""
    target = Path(target)

    def recheck() -> None:
        check_target(target, kind, overwrite=overwrite, protect=protect, ours=ours, what=what, elsewhere=elsewhere)

    recheck()
    staging = _staging_folder(target, what)
    try:
        yield staging
        atomic_write(staging / MARKER, marker_text(kind, **(meta or {})))
        staging.chmod(0o755)
        _move_into_place(staging, target, recheck, what)
    except BaseException as exc:
        remove_tree(staging)
        _refuse_failed_write(exc, target, what)
        raise


@contextmanager
def staged_file(
    target: Path,
    kind: str,
    *,
    overwrite: bool = False,
    protect: Sequence[Path] = (),
    ours: Callable[[Path], bool] | None = None,
    what: str = "output file",
    elsewhere: str | None = "choose a new path",
) -> Iterator[Path]:
    """A path inside a fresh staging folder to write ``target`` to; renamed over ``target`` at the end."""
    target = Path(target)

    def recheck() -> None:
        check_target(
            target, kind, overwrite=overwrite, protect=protect, ours=ours or (lambda p: False), what=what,
            elsewhere=elsewhere,
        )  # fmt: skip

    recheck()
    staging = _staging_folder(target, what)
    try:
        tmp = staging / target.name
        yield tmp
        os.chmod(tmp, 0o644)
        _move_into_place(tmp, target, recheck, what)
    except BaseException as exc:
        remove_tree(staging)
        _refuse_failed_write(exc, target, what)
        raise
    remove_tree(staging)


def is_regular_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as an input file (None when it is a regular file, or a link to one):
    "does not exist", or what it is instead ("is a folder, not a regular file"). A named pipe or a device
    is never opened: a read would wait forever, or never end."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}  # fmt: skip
    kind = next((name for test, name in kinds.items() if test(mode)), "not a file")
    return f"is {kind}, not a regular file"


def is_gguf_file(path: Path) -> bool:
    """A GGUF file (its magic bytes): the only kind of file ``export --overwrite`` replaces."""
    if not is_regular_file(path):
        return False
    with path.open("rb") as fh:
        return fh.read(4) == b"GGUF"


def is_card(path: Path) -> bool:
    """A model card codetune wrote (its metadata carries the codetune tag): what ``--overwrite`` may replace."""
    if not is_regular_file(path):
        return False
    import yaml

    text = path.read_bytes()[: 1 << 20].decode("utf-8", "replace")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return False
    try:
        meta = yaml.safe_load(text[4:].split("\n---\n", 1)[0])
    except (yaml.YAMLError, RecursionError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("tags"), list) and "codetune" in meta["tags"]


def ours_or_legacy(kind: str, legacy_file: str) -> Callable[[Path], bool]:
    """Whether a folder is a codetune ``kind`` output: its marker, or, for outputs written before
    markers existed, ``legacy_file`` in a folder that sits directly in a codetune run directory
    (where nobody else could have planted it)."""

    def ours(path: Path) -> bool:
        if is_kind(path, kind):
            return True
        return (
            path.is_dir()
            and not path.is_symlink()
            and RunDir(path.parent).is_run
            and is_regular_file(path / legacy_file)
        )

    return ours


# ---------------------------------------------------------------------------------------
# The run directory


class RunDir:
    """A run directory's layout and the rules for changing it.

    ``recipe.yaml`` (the resolved recipe), ``data/`` (prepare), ``checkpoints/``, ``adapter/``,
    ``metrics.jsonl`` (train), ``eval/`` (eval), ``merged/`` (merge), ``README.md`` (card).
    A run that has trained is immutable unless the command is given ``--overwrite``.
    """

    RECIPE = RECIPE_FILE
    DATA = "data"
    STATS = "stats.json"  # in data/
    REJECTED = "rejected.jsonl"  # in data/
    DECONTAMINATED = "decontaminated.jsonl"  # in data/
    ADAPTER = "adapter"
    CHECKPOINTS = "checkpoints"
    METRICS = "metrics.jsonl"
    TRAIN_SUMMARY = "train_summary.json"
    LOSS_TABLE = "loss_table.md"
    LOSS_PLOT = "loss.png"
    EVAL = "eval"
    MERGED = "merged"
    CARD = "README.md"
    REPORT = "report.html"
    RL = "rl"  # codetune rl: adapter/, checkpoints/, metrics.jsonl, rl_summary.json
    RL_SUMMARY = "rl_summary.json"
    RL_FILTER = "filter.json"  # in rl/: the difficulty filter's pass rate per task
    TRAINING_OUTPUTS = (CHECKPOINTS, ADAPTER, METRICS, TRAIN_SUMMARY, LOSS_TABLE, LOSS_PLOT, RL)

    STAGES = ("sft", "rl")  # whose adapter and eval/ the run's adapter-reading commands use

    def __init__(self, path: str | Path, stage: str = "sft"):
        if stage not in self.STAGES:
            raise ValueError(f"stage {stage!r}: use one of {', '.join(self.STAGES)}")
        self.path, self.stage = Path(path), stage

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})" if self.stage == "sft" else f"RunDir({str(self.path)!r}, stage='rl')"

    @property
    def _stage_root(self) -> Path:
        """Where the stage's adapter and eval/ live: the run's root for SFT, rl/ for GRPO (codetune rl)."""
        return self.path / self.RL if self.stage == "rl" else self.path

    def __fspath__(self) -> str:
        return str(self.path)

    recipe_file = property(lambda self: self.path / self.RECIPE)
    data = property(lambda self: self.path / self.DATA)
    stats = property(lambda self: self.data / self.STATS)
    rejected = property(lambda self: self.data / self.REJECTED)
    adapter = property(lambda self: self._stage_root / self.ADAPTER)
    adapter_config = property(lambda self: self.adapter / ADAPTER_CONFIG)
    checkpoints = property(lambda self: self._stage_root / self.CHECKPOINTS)
    metrics = property(lambda self: self.path / self.METRICS)
    train_summary = property(lambda self: self.path / self.TRAIN_SUMMARY)
    loss_table = property(lambda self: self.path / self.LOSS_TABLE)
    loss_plot = property(lambda self: self.path / self.LOSS_PLOT)
    eval = property(lambda self: self._stage_root / self.EVAL)
    eval_summary = property(lambda self: self.eval / EVAL_SUMMARY)
    merged = property(lambda self: self.path / self.MERGED)
    card = property(lambda self: self.path / self.CARD)
    report = property(lambda self: self.path / self.REPORT)
    rl = property(lambda self: self.path / self.RL)
    rl_adapter = property(lambda self: self.rl / self.ADAPTER)
    rl_eval = property(lambda self: self.rl / self.EVAL)
    rl_checkpoints = property(lambda self: self.rl / self.CHECKPOINTS)
    rl_metrics = property(lambda self: self.rl / self.METRICS)
    rl_summary = property(lambda self: self.rl / self.RL_SUMMARY)
    rl_filter = property(lambda self: self.rl / self.RL_FILTER)

    @property
    def is_run(self) -> bool:
        """A folder codetune made as a run: its marker, and nothing else. A folder that merely looks like a
        run (a recipe, data/, an adapter) may be anyone's: codetune never writes into it or clears it."""
        return is_kind(self.path, "run")

    def split(self, name: str) -> Path:
        """A prepared split: ``data/train.parquet`` or ``data/test.parquet``."""
        return self.data / self.split_file(name)

    @staticmethod
    def split_file(name: str) -> str:
        return f"{name}.parquet"

    # The run's JSON files, read through runfiles' validated loaders: a damaged one is one error naming it.
    def read_train_summary(self) -> dict | None:
        """train_summary.json, checked; None when training has not written one."""
        return read_train_summary(self.train_summary)

    def read_metrics(self) -> list[dict] | None:
        """The lines of metrics.jsonl, checked; None when there is none."""
        return read_metrics(self.metrics)

    def read_adapter_config(self) -> dict:
        """The adapter's adapter_config.json, checked (a LoRA's fields); a missing or damaged one is refused."""
        return _read_adapter_config(self.adapter_config)

    def read_eval_summary(self) -> dict | None:
        """eval/summary.json, checked; None when the run has not been evaluated."""
        return read_eval_summary(self.eval_summary)

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints the Trainer finished writing (trainer_state.json is written last), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

    def is_trained(self) -> bool:
        return self.adapter_config.is_file() or bool(self.complete_checkpoints())

    def adapter_fingerprint(self) -> str | None:
        """The SHA-256 of the adapter's weights: what derived outputs (merged/, eval/, the card) record, so
        that one made from an earlier adapter is known as stale. None while there is no adapter."""
        weights = sorted(self.adapter.glob("adapter_model*.safetensors")) + sorted(self.adapter.glob("*.bin"))
        return files_sha256(weights) if weights else None

    def require_adapter(self) -> Path:
        """The adapter folder of a trained run, checked (``check_adapter``); the one message for a run
        without one."""
        if not self.recipe_file.is_file():
            raise RecipeError(f"{self.path} is not a run directory (no {self.RECIPE})")
        if not self.adapter_config.is_file():
            command = "codetune rl" if self.stage == "rl" else "codetune train"
            raise RecipeError(f"{self.path} has no trained adapter ({self.adapter} is missing): run `{command}` first")
        return self.check_adapter()

    def check_adapter(self) -> Path:
        """The adapter's files as PEFT reads them, checked before any model loads: adapter_config.json a
        JSON object with a LoRA's fields, the weights a complete safetensors file. A damaged one is one
        error naming the file, instead of PEFT's or safetensors' traceback."""
        _read_adapter_config(self.adapter_config)
        weights = self.adapter / ADAPTER_WEIGHTS
        if not weights.is_file():
            if any(self.adapter.glob("*.bin")):
                return self.adapter  # PEFT's older pickle format: read by torch as it loads
            raise InputError(f"{weights} is missing: the adapter is incomplete; train the run again")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), "np") as fh:
                fh.keys()
        except (SafetensorError, OSError) as exc:
            raise InputError(
                f"{weights} is not a complete safetensors file ({' '.join(str(exc).split())}): the adapter is "
                "damaged; train the run again or restore the file"
            ) from None
        return self.adapter

    def check_usable(self) -> RunDir:
        """Refuse, before any work and without creating anything, a run directory codetune may not write:
        codetune writes into a run it made, or into a new or empty folder, never into another folder."""
        p = self.path
        if p.exists():
            if not p.is_dir():
                raise OutputError(f"run directory {p} is a file, not a folder: choose another --run-dir")
            if not self.is_run and any(p.iterdir()):
                raise OutputError(
                    f"run directory {p} is a folder codetune did not create (no {MARKER}) and is not empty: "
                    "codetune will not write into it, nor delete anything in it; choose a new or empty --run-dir"
                )
        return self

    def ensure(self) -> RunDir:
        """Create the run directory (with its marker) or check that an existing one may be written."""
        p = self.check_usable().path
        try:
            p.mkdir(parents=True, exist_ok=True)
            if read_marker(p) is None:
                atomic_write(p / MARKER, marker_text("run"))
        except OSError as exc:
            raise OutputError(
                f"cannot write to run directory {p}: {exc.strerror}; choose a writable --run-dir"
            ) from None
        return self

    def check_mutable(self, overwrite: bool, action: str) -> bool:
        """True when the run has trained (and ``overwrite`` allows ``action`` to start it over)."""
        trained = self.is_trained()
        if trained and not overwrite:
            raise OutputError(
                f"{self.path} holds a trained run (adapter/ or checkpoints/): {action} would leave the recipe and "
                "data disagreeing with it. Pass --overwrite to start the run over (its training is deleted), or "
                "choose another --run-dir"
            )
        return trained

    def clear_training(self) -> None:
        """Delete the outputs of an earlier training (for --overwrite) and everything made from them
        (``clear_derived``), nothing else."""
        for name in self.TRAINING_OUTPUTS:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                remove_tree(target)
            else:
                target.unlink(missing_ok=True)
        self.clear_derived()

    def clear_derived(self) -> list[Path]:
        """Delete what codetune made from the run's adapter (eval/, merged/, the card, the report, GGUF
        files), so that a run started over never shows or exports the old model's results. Only outputs
        that codetune made (their marker, or their own form) are deleted; anything else stays."""
        derived = {
            self.eval: ours_or_legacy("eval", EVAL_SUMMARY),
            self.merged: ours_or_legacy("merged", MERGE_RECORD),
            self.card: is_card,
            self.report: is_report,
        }
        derived.update({p: is_gguf_file for p in self.path.glob("*.gguf")})
        removed = []
        for target, ours in derived.items():
            if target.is_symlink() or not target.exists() or not ours(target):
                continue
            remove_tree(target) if target.is_dir() else target.unlink()
            removed.append(target)
        return removed


def files_sha256(paths: Sequence[Path]) -> str:
    """One SHA-256 over the contents of ``paths``, in the order given."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_fingerprint(folder: Path) -> str:
    """The SHA-256 of a model folder's weights and config: its identity, wherever the folder sits."""
    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    return files_sha256([p for p in [folder / "config.json", *weights] if p.is_file()])


def run_of_eval(path: Path) -> RunDir | None:
    """The run whose evaluation folder ``path`` is, or lies in (``RUN/eval``, ``RUN/eval/sub``); else None."""
    resolved = Path(path).resolve()
    for folder in (resolved, *resolved.parents):
        if folder.name == RunDir.EVAL and RunDir(folder.parent).is_run:
            return RunDir(folder.parent)
        if folder.name == RunDir.EVAL and folder.parent.name == RunDir.RL and RunDir(folder.parent.parent).is_run:
            return RunDir(folder.parent.parent, stage="rl")
    return None


def _read_adapter_config(path: Path) -> dict:
    """PEFT's adapter_config.json, validated for the fields codetune and PEFT rely on (runfiles' loader)."""
    config = read_adapter_config(path)
    if config is None:
        raise InputError(f"{path} is missing: the adapter is incomplete; train the run again")
    return config


def is_report(path: Path) -> bool:
    """A report.html that codetune wrote (its generator meta tag)."""
    if not is_regular_file(path):
        return False
    with path.open("rb") as fh:
        return b'name="generator" content="codetune' in fh.read(4096)
