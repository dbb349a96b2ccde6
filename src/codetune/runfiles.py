"""The JSON files of a run that codetune reads back, each read through one validated loader.

``eval/summary.json`` (eval), ``train_summary.json`` and the lines of ``metrics.jsonl`` (train), and the
adapter's ``adapter_config.json`` (PEFT's): every command and page that reads one (report, card, serve's
``GET /``, train --resume, eval adding suites) reads it here. A read is bounded in size; the text must be
UTF-8 and JSON nested at most ``MAX_DEPTH`` deep; the value is checked against a pydantic model of what
codetune writes (types and ranges of the fields it relies on; fields it does not know are kept). A damaged
file is one :class:`~codetune.errors.InputError` naming the file (and the row and field), never a
traceback, a 500 or a page that shows garbage. ``NaN`` and ``Infinity`` pass where codetune itself may
write them (a loss, a score); a count or a step must be a whole number that fits.

The file names are :mod:`codetune.rundir`'s: these loaders take paths (``RunDir`` gives them).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .errors import InputError

MAX_JSON_BYTES = 64 << 20  # a summary is kilobytes; a metrics log of a long run a few megabytes
MAX_METRICS_BYTES = 256 << 20
MAX_DEPTH = 64  # codetune writes 4 levels; a deeper file is damaged (and deep enough to exhaust the stack)

# What codetune writes: a count or step is a whole number (not a bool) that numpy and matplotlib can hold;
# a loss or score a number (NaN and Infinity included: json.dumps writes a diverged loss so).
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
Step = Annotated[int, Field(ge=0, le=2**53)]
Number = float  # strict: an int or a float, never a bool or text


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class AdapterConfig(_Model):
    """PEFT's adapter_config.json: the fields codetune and PEFT rely on."""

    peft_type: str = Field(pattern="^LORA$")
    r: int = Field(gt=0)
    lora_alpha: int | float
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, Annotated[int, Field(gt=0)]] | None = None  # per-module ranks (vLLM's serve reads them)


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class SuiteScores(_Model):
    """One model's scores of one suite in summary.json: ROUGE means (all four, with the sample count), or
    pass@k of executed tests. A field is absent or of its type: codetune never writes null for one (but for
    ``adapter_sha256``: a model without an adapter)."""

    samples: Count = None
    tasks: Count = None
    tasks_in_suite: Count = None
    missing_tasks: int = None
    partial: bool = None
    n_per_task: Count | dict[str, Count] = None
    sandbox: str = None
    parse_rate: Number = None
    rouge1: Number = None
    rouge2: Number = None
    rougeL: Number = None
    rougeLsum: Number = None
    adapter_sha256: str | None = None
    held_out: bool = None

    @model_validator(mode="after")
    def _scores_complete(self) -> SuiteScores:
        for key, value in (self.__pydantic_extra__ or {}).items():
            if key.startswith("pass@") and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise PydanticCustomError("field", "{field}: {why}", {"field": key, "why": "not a number"})
        present = [k for k in ROUGE_KEYS if k in self.model_fields_set]
        if present and (len(present) < len(ROUGE_KEYS) or "samples" not in self.model_fields_set):
            missing = [k for k in ("samples", *ROUGE_KEYS) if k not in self.model_fields_set]
            why = "missing beside the other ROUGE scores"
            raise PydanticCustomError("field", "{field}: {why}", {"field": missing[0], "why": why})
        return self


class EvalSummary(_Model):
    """eval/summary.json (or an ``eval --out`` folder's): the results, model by model, suite by suite."""

    results: dict[str, dict[str, SuiteScores]]
    suites: list[str] | None = None
    source: str | None = None
    adapter_sha256: str | None = None


class TrainSummary(_Model):
    """train_summary.json: what training did."""

    recipe: str | None = None
    global_step: Step | None = None
    epochs: Number | None = None
    train_loss_mean: Number | None = None
    last_train_loss: Number | None = None
    last_eval_loss: Number | None = None
    tokens: Count | None = None
    wall_s_this_session: Number | None = None
    trainable_parameters: Count | None = None
    total_parameters: Count | None = None
    resumed_from: str | None = None
    world_size: Count | None = None
    device: str | None = None


class MetricsLine(_Model):
    """One line of metrics.jsonl: one log of the Trainer."""

    step: Step
    epoch: Number | None = None
    train_loss: Number | None = None
    eval_loss: Number | None = None
    learning_rate: Number | None = None
    grad_norm: Number | None = None
    tokens: Count | None = None
    tokens_per_s: Number | None = None
    elapsed_s: Number | None = None


# ---------------------------------------------------------------------------------------
# Reading


def read_bytes(path: Path, limit: int, fix: str) -> bytes | None:
    """The bytes of the regular file ``path`` (None when nothing is there), at most ``limit`` of them. A
    folder, a pipe or a device is refused without waiting on it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}); {fix}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{path} is not a regular file (a folder, a pipe or a device); {fix}")
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise InputError(f"{path}: cannot be read ({exc.strerror}); {fix}") from None
    if len(data) > limit:
        raise InputError(f"{path} is larger than {limit >> 20} MiB: not a file codetune wrote; {fix}")
    return data


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def parse_json(data: bytes, where: str, fix: str) -> Any:
    """``data`` as JSON; ``where`` names it in the error (the file, and the row of a JSON-lines file)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: not UTF-8 text (byte {exc.start}); {fix}") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deep; {fix}") from None
    except ValueError as exc:  # a JSONDecodeError, or an integer of more digits than Python converts
        raise InputError(f"{where}: not valid JSON ({' '.join(str(exc).split())[:200]}); {fix}") from None
    if _too_deep(value):
        raise InputError(f"{where}: JSON nested more than {MAX_DEPTH} deep; {fix}")
    return value


def check_model(value: Any, model: type[BaseModel], where: str, fix: str) -> dict:
    """``value`` (parsed JSON) checked against ``model``; returned as read (the models coerce nothing)."""
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a JSON object, got {_kind(value)}; {fix}")
    try:
        model.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc, msg, got = list(err["loc"]), err["msg"], err.get("input")
        if err["type"] == "field":  # a check of the whole object that names one of its fields
            loc.append(err["ctx"]["field"])
            msg, got = err["ctx"]["why"], got.get(err["ctx"]["field"]) if isinstance(got, dict) else None
        field = ".".join(str(p) for p in loc) or "(object)"
        detail = msg if err["type"] == "missing" else f"{msg}, got {_kind(got)}"
        raise InputError(f"{where}, field {field!r}: {detail}; {fix}") from None
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"the number {value!r}" if len(repr(value)) <= 30 else "a number too large"
    return names.get(type(value), type(value).__name__)


def read_json_file(path: Path, model: type[BaseModel], fix: str, limit: int = MAX_JSON_BYTES) -> dict | None:
    """The JSON object in ``path`` checked against ``model``; None when there is no such file."""
    data = read_bytes(path, limit, fix)
    if data is None:
        return None
    return check_model(parse_json(data, str(path), fix), model, str(path), fix)


# How to mend each file, said in its error
EVAL_FIX = "evaluate again (`codetune eval RUN_DIR --overwrite`) or restore the file"
TRAIN_FIX = "train the run again or restore the file"
ADAPTER_FIX = "the adapter is damaged; train the run again or restore the file"


def read_eval_summary(path: Path) -> dict | None:
    return read_json_file(path, EvalSummary, EVAL_FIX)


def read_train_summary(path: Path) -> dict | None:
    return read_json_file(path, TrainSummary, TRAIN_FIX)


def read_adapter_config(path: Path) -> dict | None:
    return read_json_file(path, AdapterConfig, ADAPTER_FIX, limit=1 << 20)


def read_metrics(path: Path) -> list[dict] | None:
    """The lines of metrics.jsonl, each checked (blank lines skipped); None when there is no such file."""
    data = read_bytes(path, MAX_METRICS_BYTES, TRAIN_FIX)
    if data is None:
        return None
    rows = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if line.strip():
            where = f"{path}, row {number}"
            rows.append(check_model(parse_json(line, where, TRAIN_FIX), MetricsLine, where, TRAIN_FIX))
    return rows
