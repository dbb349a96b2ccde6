"""Data: the row formats codetune reads (alpaca, chat, prompts), JSON lines written safely, a run's
prepared splits, and the record of which tasks a model trained on (so held-out scores stay held out).
The prepare stage (codetune.prepare) builds on it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, InputError, RecipeError
from .rundir import HELDOUT_RECORD, RunDir, atomic_write, check_target, file_problem, is_regular_file, staged_file

IGNORE_INDEX = -100
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_ROLES = ("system", "user", "assistant")


@dataclass
class RowProblem:
    row: int
    field: str
    reason: str

    def message(self, where: str) -> str:
        return f"{where}, row {self.row}, field {self.field!r}: {self.reason}"


@dataclass
class Example:
    row: int  # 1-based row number in the source (the line number for .jsonl)
    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)  # task_id, entry_point, test_list for executable rows


# ---------------------------------------------------------------------------------------
# Reading


def _check_input_file(path: Path) -> None:
    problem = file_problem(path)
    if problem is not None:
        raise InputError(f"{path} {problem}: give a JSON-lines file")


def read_jsonl(path: Path) -> list[dict]:
    """JSON lines, each row a dict with ``__row__`` (its line number); non-objects as ``__not_an_object__``."""
    path = Path(path)
    _check_input_file(path)
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}, row {lineno}: undecodable text (not UTF-8: {exc.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, row {lineno}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise DataError(f"{path}, row {lineno}: nested too deeply to read; remove or fix the row") from None
            rows.append(obj if isinstance(obj, dict) else {"__not_an_object__": obj})
            rows[-1]["__row__"] = lineno
    return rows


def _read_table(path: Path, kind: str) -> list[dict]:
    import datasets

    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: undecodable text (not UTF-8: {exc.reason})") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot read as {kind}: {exc}") from None
    return [dict(r, __row__=i) for i, r in enumerate(table, start=1)]


def read_source(source: str, *, revision: str | None = None, hub_split: str = "train") -> tuple[list[dict], str]:
    """All rows of a source, each with ``__row__`` (1-based), and a name for messages."""
    if source == "starter":
        from .starter import load_starter

        return [dict(r, __row__=i) for i, r in enumerate(load_starter(), start=1)], "starter set"
    path = Path(source).expanduser()
    if path.suffix in _LOCAL_SUFFIXES or path.exists() or path.is_symlink():
        problem = file_problem(path)
        if problem == "does not exist":
            raise RecipeError(f"data.source: file not found: {source}")
        if problem is not None:
            raise RecipeError(f"data.source: {source} {problem}; give a data file")
        if path.suffix == ".jsonl":
            return read_jsonl(path), str(path)
        if path.suffix == ".json":
            try:
                obj = json.loads(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: undecodable text (not UTF-8: {exc.reason})") from None
            except RecursionError:
                raise DataError(f"{path}: nested too deeply to read; remove or fix the deep row") from None
            except json.JSONDecodeError:
                return read_jsonl(path), str(path)  # JSON lines saved as .json
            if not isinstance(obj, list):
                raise DataError(f"{path}: expected a JSON list of row objects")
            return [
                dict(r, __row__=i) if isinstance(r, dict) else {"__not_an_object__": r, "__row__": i}
                for i, r in enumerate(obj, start=1)
            ], str(path)
        if path.suffix in (".parquet", ".csv"):
            return _read_table(path, path.suffix[1:]), str(path)
        raise RecipeError(f"data.source: {source} has an unsupported suffix; use one of {_LOCAL_SUFFIXES}")
    import datasets

    try:
        table = datasets.load_dataset(source, revision=revision, split=hub_split)
    except Exception as exc:
        raise RecipeError(
            f"data.source: cannot load hub dataset {source!r} (split {hub_split!r}): {exc}. "
            "Offline, point data.source at a local .jsonl/.json/.parquet/.csv file."
        ) from None
    return [dict(r, __row__=i) for i, r in enumerate(table, start=1)], f"{source} (hub)"


# ---------------------------------------------------------------------------------------
# Checking and formatting


def _check_text(row: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise _Bad(key, "missing")
    value = row[key]
    if not isinstance(value, str):
        raise _Bad(key, f"expected text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Bad(key, "undecodable text (a lone surrogate escape)") from None
    if not allow_empty and not value.strip():
        raise _Bad(key, "empty")
    return value


class _Bad(Exception):
    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field = field_name
        self.reason = reason


def user_content(instruction: str, input_text: str, formatting: str) -> str:
    if formatting == "reference":
        # The reference notebook's exact join: a newline then a space, even when input is empty.
        return instruction + "\n Input: " + input_text
    return instruction if not input_text.strip() else f"{instruction}\nInput: {input_text}"


def row_to_example(row: dict, fmt: str, formatting: str) -> Example:
    """One source row -> an Example, or ``_Bad`` naming the field that is wrong."""
    if "__not_an_object__" in row:
        raise _Bad("(row)", f"expected a JSON object, got {type(row['__not_an_object__']).__name__}")
    meta = {k: row[k] for k in ("task_id", "entry_point", "test_list") if k in row}
    if fmt == "alpaca":
        instruction = _check_text(row, "instruction")
        input_text = _check_text(row, "input", allow_empty=True) if row.get("input") is not None else ""
        output = _check_text(row, "output")
        messages = [
            {"role": "user", "content": user_content(instruction, input_text, formatting)},
            {"role": "assistant", "content": output},
        ]
        return Example(row["__row__"], messages, meta)
    clean = _clean_messages(row.get("messages"))
    if clean[-1]["role"] != "assistant":
        raise _Bad(f"messages[{len(clean) - 1}].role", "the last message must be the assistant's answer")
    if not any(m["role"] == "user" for m in clean):
        raise _Bad("messages", "no user message")
    return Example(row["__row__"], clean, meta)


def _clean_messages(msgs) -> list[dict[str, str]]:
    """A conversation checked message by message: a list of {role, content}, known roles, text content."""
    if msgs is None:
        raise _Bad("messages", "missing")
    if not isinstance(msgs, list) or not msgs:
        raise _Bad("messages", "expected a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _Bad(f"messages[{i}]", "expected an object with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise _Bad(f"messages[{i}].role", f"expected one of {list(_ROLES)}, got {role!r}")
        try:
            clean.append({"role": role, "content": _check_text(m, "content")})
        except _Bad as bad:
            raise _Bad(f"messages[{i}].{bad.field}", bad.reason) from None
    return clean


# Per-request settings of the OpenAI API and of codetune's recipe: a row of generate --file may not carry them
_ROW_SETTINGS = (
    "max_tokens", "max_new_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "n", "do_sample", "num_beams", "repetition_penalty", "frequency_penalty", "presence_penalty", "stop_tokens",
)  # fmt: skip


def read_prompts(path: Path) -> list[list[dict[str, str]]]:
    """``generate --file``: one conversation per JSON line, ``{"prompt": TEXT}`` or ``{"messages": [...]}``
    ending with a user turn; a malformed row stops it, naming the file, row and field. Generation settings
    apply to the whole file (``--set generation.*``): a row that carries its own is refused, not ignored."""
    path = Path(path)
    convs = []
    for obj in read_jsonl(path):
        lineno = obj["__row__"]
        try:
            if "__not_an_object__" in obj:
                raise _Bad("(row)", f"expected a JSON object, got {type(obj['__not_an_object__']).__name__}")
            setting = next((k for k in _ROW_SETTINGS if k in obj), None)
            if setting is not None:
                raise _Bad(
                    setting,
                    "a row's own generation settings are not applied; set them for the whole file with "
                    "--set generation.max_new_tokens=N (temperature, top_p, ...) and drop the field",
                )
            if "messages" in obj:
                clean = _clean_messages(obj["messages"])
                if clean[-1]["role"] != "user":
                    raise _Bad(f"messages[{len(clean) - 1}].role", "the last message must be the user's, to answer")
                convs.append(clean)
            else:
                convs.append([{"role": "user", "content": _check_text(obj, "prompt")}])
        except _Bad as bad:
            hint = "" if bad.field in _ROW_SETTINGS else " (give 'prompt' or 'messages')"
            raise InputError(f"{path}, row {lineno}, field {bad.field!r}: {bad.reason}{hint}") from None
    if not convs:
        raise InputError(f"{path}: no prompts")
    return convs


# ---------------------------------------------------------------------------------------
# Packing


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of row indices into rows of ``capacity`` tokens."""
    bins: list[list[int]] = []
    room: list[int] = []
    for idx in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        need = lengths[idx]
        best = min((b for b in range(len(bins)) if room[b] >= need), key=lambda b: room[b], default=None)
        if best is None:
            bins.append([idx])
            room.append(capacity - need)
        else:
            bins[best].append(idx)
            room[best] -= need
    return bins


def packed_share(lengths: list[int], capacity: int) -> tuple[float, int]:
    if not lengths:
        return 0.0, 0
    bins = pack_bins(lengths, capacity)
    return 1 - sum(lengths) / (len(bins) * capacity), len(bins)


# ---------------------------------------------------------------------------------------
# Writing


def _json_line(row: dict) -> str:
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate has no UTF-8 form; JSON's \\u escape keeps it, losslessly
        line = json.dumps(row, ensure_ascii=True)
    return line + "\n"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write JSON lines through a new temporary file renamed over ``path``: a reader never sees half
    a file, and a link planted at a predictable temporary name is never followed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(_json_line(r) for r in rows))


def _is_completions_file(path: Path) -> bool:
    if not is_regular_file(path):
        return False
    with path.open("rb") as fh:
        first = fh.readline(1 << 20)
    try:
        obj = json.loads(first)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and "completion" in obj


def write_jsonl_new(
    path: Path, rows: list[dict] | None, *, overwrite: bool = False, protect=(), check_only: bool = False
) -> None:
    """Write an output file the user named: an existing file is replaced only with ``overwrite`` and only
    when it is codetune's completions file. ``check_only``: refuse now, before any work, write nothing."""
    kw = dict(overwrite=overwrite, protect=protect, ours=_is_completions_file, what="--out")
    if check_only:
        check_target(Path(path), "completions", **kw)
        return
    with staged_file(Path(path), "completions", **kw) as tmp:
        tmp.write_text("".join(_json_line(r) for r in rows or []), encoding="utf-8")


def load_split(run_dir: Path, split: str):
    """A prepared split as a ``datasets.Dataset``."""
    import datasets

    path = RunDir(run_dir).split(split)
    if not path.is_file():
        raise RecipeError(f"{path} is missing: run `codetune prepare` for this run directory first")
    return datasets.Dataset.from_parquet(str(path))


# ---------------------------------------------------------------------------------------
# What a model trained on


def trained_task_ids(run_dir: Path) -> set[str]:
    """Task ids of executable rows in a run's training split (never scored as held-out); for a merged
    model folder, the ids its merge recorded. Empty when nothing is known (see ``known_trained_ids``)."""
    return known_trained_ids(run_dir) or set()


def known_trained_ids(folder: Path) -> set[str] | None:
    """The executable task ids a model was trained on: from a run's ``data/train.parquet``, or from the
    held-out record (``rundir.HELDOUT_RECORD``) that ``merge`` writes into a merged folder. None when there is no such
    record (a model folder or hub id from elsewhere): its starter scores are not known to be held out."""
    folder = Path(folder)
    if RunDir(folder).split("train").is_file():
        ids = set()
        for meta in load_split(folder, "train")["meta"]:
            task_id = json.loads(meta or "{}").get("task_id")
            if task_id:
                ids.add(task_id)
        return ids
    record = _heldout_record(folder)
    return set(record["trained_task_ids"]) if record is not None else None


def _heldout_record(folder: Path) -> dict | None:
    path = Path(folder) / HELDOUT_RECORD
    if not path.is_file() or path.is_symlink():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise InputError(f"{path}: not readable JSON (merge writes it; merge the run again)") from None
    ids = record.get("trained_task_ids") if isinstance(record, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise InputError(f"{path}, field 'trained_task_ids': missing or not a list of task ids")
    return record
