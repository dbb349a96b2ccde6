"""Data preparation: read a source, check every row, format chats, split, deduplicate,
decontaminate, tokenize with the right loss mask, and write it all to ``RUN_DIR/data``.

The order matters for reproducing the reference: rows are checked and formatted first, then
split with ``datasets``' own ``train_test_split`` (so the test rows are the reference's, row for
row), and only the *training* split is filtered afterwards. The test split is never filtered,
so scores stay comparable with the reference card.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, InputError
from .recipe import Recipe, RecipeError

DATA_DIR = "data"
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
    if path.is_dir():
        raise InputError(f"{path} is a folder: give a JSON-lines file")
    if not path.is_file():
        raise InputError(f"{path} does not exist: give a JSON-lines file")


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
    if path.suffix in _LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise RecipeError(f"data.source: file not found: {source}")
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


def read_prompts(path: Path) -> list[list[dict[str, str]]]:
    """``generate --file``: one conversation per JSON line, ``{"prompt": TEXT}`` or ``{"messages": [...]}``
    ending with a user turn; a malformed row stops it, naming the file, row and field."""
    path = Path(path)
    convs = []
    for obj in read_jsonl(path):
        lineno = obj["__row__"]
        try:
            if "__not_an_object__" in obj:
                raise _Bad("(row)", f"expected a JSON object, got {type(obj['__not_an_object__']).__name__}")
            if "messages" in obj:
                clean = _clean_messages(obj["messages"])
                if clean[-1]["role"] != "user":
                    raise _Bad(f"messages[{len(clean) - 1}].role", "the last message must be the user's, to answer")
                convs.append(clean)
            else:
                convs.append([{"role": "user", "content": _check_text(obj, "prompt")}])
        except _Bad as bad:
            raise InputError(
                f"{path}, row {lineno}, field {bad.field!r}: {bad.reason} (give 'prompt' or 'messages')"
            ) from None
    if not convs:
        raise InputError(f"{path}: no prompts")
    return convs


# ---------------------------------------------------------------------------------------
# Tokenizing with a loss mask


def render(tokenizer, messages, *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_spans(tokenizer, messages, text: str, turn_end: str | None = None) -> list[tuple[int, int]]:
    """Character spans of ``text`` that the assistant wrote: each answer plus its end-of-turn tokens.

    Found by rendering growing prefixes of the conversation, so it works for any template
    whose rendering of a prefix is a prefix of the whole (every chat template we know).
    ``turn_end`` (the model family's, e.g. Qwen2's ``<|im_end|>``): a span ends with that token, so
    what the template writes after it (ChatML's newline) is not trained.
    """
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        if text[:start] != render(tokenizer, messages[:i], add_generation_prompt=True):
            raise RecipeError("tokenizer.chat_template: rendering is not prefix-stable; answer-only loss needs it")
        if i == len(messages) - 1:
            end = len(text)  # the last answer owns everything after it: <|end|>, eos
        else:
            end = _common_prefix(render(tokenizer, messages[: i + 1]), text)
        if turn_end:
            closing = text.find(turn_end, start, end)
            if closing >= 0:
                end = closing + len(turn_end)
        spans.append((start, end))
    return spans


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    full_length: int


def tokenize_example(tokenizer, recipe: Recipe, messages, text: str, turn_end: str | None = None) -> Tokenized:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if recipe.data.loss_on == "answer":
        spans = assistant_spans(tokenizer, messages, text, turn_end)
        trained = [any(s <= start < e for s, e in spans) for start, _ in offsets]
    else:
        trained = [True] * len(ids)
    add_bos, add_eos = recipe.tokenizer.add_bos_token, recipe.tokenizer.add_eos_token
    full = len(ids) + add_bos + add_eos
    max_len = recipe.data.max_length
    truncated = full > max_len
    # Cut the text, never the added special tokens: a tokenizer called with truncation=True does the
    # same (the reference's over-long rows end in their eos, 32000, as the 512th token).
    room = max_len - add_bos - add_eos
    ids, trained = ids[:room], trained[:room]
    if add_bos:
        ids, trained = [tokenizer.bos_token_id, *ids], [recipe.data.loss_on == "all", *trained]
    if add_eos:
        ids, trained = [*ids, tokenizer.eos_token_id], [*trained, True]
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
    return Tokenized(ids, labels, truncated, full)


# ---------------------------------------------------------------------------------------
# Deduplication and decontamination


def _norm_ws(text: str) -> str:
    return " ".join(text.split())


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def example_key(ex: Example) -> str:
    joined = "\x1e".join(f"{m['role']}\x1f{_norm_ws(m['content'])}" for m in ex.messages)
    return hashlib.sha1(joined.encode("utf-8")).hexdigest()


class NgramIndex:
    """Word n-grams of a benchmark's texts; texts shorter than n are matched whole."""

    def __init__(self, texts: list[str], n: int):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: list[str] = []
        for t in texts:
            w = _words(t)
            if len(w) >= n:
                self.grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
            elif len(w) >= 4:
                self.short.append(" " + " ".join(w) + " ")

    def match(self, text: str) -> str | None:
        w = _words(text)
        for i in range(len(w) - self.n + 1):
            gram = tuple(w[i : i + self.n])
            if gram in self.grams:
                return " ".join(gram)
        if self.short:
            joined = " " + " ".join(w) + " "
            for s in self.short:
                if s in joined:
                    return s.strip()
        return None


def _prompt_text(ex: Example) -> str:
    return " ".join(m["content"] for m in ex.messages if m["role"] != "assistant")


def _all_text(ex: Example) -> str:
    return " ".join(m["content"] for m in ex.messages)


def _benchmark_texts(name: str, recipe: Recipe) -> list[str]:
    """The texts of a suite that ``data.decontaminate`` names (the recipe allows only suites that have them)."""
    from .suites import get_suite

    return get_suite(name).decontamination(recipe)


# ---------------------------------------------------------------------------------------
# Statistics


def length_summary(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"count": 0}
    s = sorted(lengths)
    p95 = s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]
    return {
        "count": len(s),
        "min": s[0],
        "median": statistics.median(s),
        "mean": round(statistics.fmean(s), 1),
        "p95": p95,
        "max": s[-1],
        "total": sum(s),
    }


def padded_batch_share(lengths: list[int], batch_size: int, seed: int) -> float:
    """Share of a padded batch that is padding, for shuffled batches padded to their longest row."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    real = padded = 0
    for i in range(0, len(order), batch_size):
        batch = order[i : i + batch_size]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1 - real / padded if padded else 0.0


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
# The stage


@dataclass
class PrepareResult:
    data_dir: Path
    stats: dict[str, Any]


def _example_record(ex: Example, tok: Tokenized, text: str) -> dict[str, Any]:
    return {
        "row": ex.row,
        "prompt": ex.messages[:-1],
        "reference": ex.messages[-1]["content"],
        "messages": ex.messages,
        "text": text,
        "input_ids": tok.input_ids,
        "labels": tok.labels,
        "n_tokens": len(tok.input_ids),
        "truncated": tok.truncated,
        "meta": json.dumps(ex.meta),
    }


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
    from .rundir import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(_json_line(r) for r in rows))


def _is_completions_file(path: Path) -> bool:
    from .rundir import is_regular_file

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
    from .rundir import check_target, staged_file

    kw = dict(overwrite=overwrite, protect=protect, ours=_is_completions_file, what="--out")
    if check_only:
        check_target(Path(path), "completions", **kw)
        return
    with staged_file(Path(path), "completions", **kw) as tmp:
        tmp.write_text("".join(_json_line(r) for r in rows or []), encoding="utf-8")


def _write_split(path: Path, records: list[dict]) -> None:
    import datasets

    if records:
        datasets.disable_progress_bars()
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        path.write_bytes(b"")


def prepare(
    recipe: Recipe, run_dir: Path, *, skip_invalid: bool = False, overwrite: bool = False, log=print
) -> PrepareResult:
    """Write ``RUN_DIR/data/{train,test}.parquet`` and ``stats.json`` for ``recipe``.

    The steps, in order: read the rows, check and format them and split them (``_check_and_split``),
    deduplicate and decontaminate the training split, tokenize both splits, count, write. Everything is
    written to a staging folder first and moved into place at the end, so a failure never leaves a
    half-written ``data/`` that later stages would take for complete. A run that has trained is left
    alone unless ``overwrite`` (its training is then deleted, since it would no longer match the data).
    """
    from .families import family_for_source
    from .model import load_tokenizer
    from .recipe import save_recipe
    from .rundir import RunDir

    rd = RunDir(run_dir)
    rd.ensure()  # a foreign or read-only folder fails here, before any work
    retrain = rd.check_mutable(overwrite, "preparing its data again")
    d = recipe.data
    tokenizer = load_tokenizer(recipe)  # fails on a bad tokenizer before any data is read
    turn_end = family_for_source(recipe.model.name_or_path, revision=recipe.model.revision).turn_end
    rows, where = read_source(d.source, revision=d.revision, hub_split=d.hub_split)
    log(f"read {len(rows)} rows from {where}")
    checker = _RowChecker(d, where, stop=not (skip_invalid or d.invalid_rows == "drop_after_split"))

    train, test, counts = _check_and_split(rows, d, checker)
    if d.dedupe:
        train = _dedupe(train, counts)
    train, contaminated = _decontaminate(train, test, recipe, counts)
    train_records, train_truncated = _tokenize_train(train, tokenizer, recipe, turn_end, checker, skip_invalid, counts)
    test_records, test_truncated = _tokenize_test(test, tokenizer, recipe, turn_end)
    counts.update(train_final=len(train_records), test_final=len(test_records))
    stats = _stats(recipe, where, counts, train_records, test_records, train_truncated, test_truncated)

    _write_data(rd.data, train_records, test_records, checker.rejected, contaminated, stats)
    if retrain:
        log(f"--overwrite: deleted the earlier training of {run_dir}, which no longer matches its data")
        rd.clear_training()
    save_recipe(recipe, run_dir)
    if checker.rejected:
        log(f"set aside {len(checker.rejected)} invalid rows -> {rd.data / 'rejected.jsonl'}")
    return PrepareResult(rd.data, stats)


class _RowChecker:
    """Turns source rows into Examples; a bad row stops the stage (``stop``) or is set aside in ``rejected``."""

    def __init__(self, d, where: str, stop: bool):
        self.d, self.where, self.stop = d, where, stop
        self.rejected: list[dict] = []

    def __call__(self, chosen: list[dict], split_name: str | None = None) -> list[Example]:
        kept = []
        for row in chosen:
            try:
                kept.append(row_to_example(row, self.d.format, self.d.formatting))
            except _Bad as bad:
                problem = RowProblem(row["__row__"], bad.field, bad.reason)
                if self.stop:
                    raise DataError(
                        problem.message(self.where) + " (use --skip-invalid to set such rows aside)"
                    ) from None
                entry = {"row": problem.row, "field": problem.field, "reason": problem.reason}
                if split_name:
                    entry["split"] = split_name
                entry["data"] = {k: v for k, v in row.items() if k != "__row__"}
                self.rejected.append(entry)
        return kept


def _split_indices(n: int, d, where: str) -> tuple[list[int], list[int]]:
    import datasets

    try:
        split = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(
            test_size=d.split.test_size, seed=d.split.seed
        )
    except ValueError as exc:  # datasets' own message says which way the sizes fail
        raise DataError(
            f"{where}: data.split.test_size {d.split.test_size} cannot split {n} usable row(s) into "
            f"non-empty train and test splits ({exc}); give more rows or a smaller test_size"
        ) from None
    return split["train"]["i"], split["test"]["i"]


def _check_and_split(rows: list[dict], d, checker: _RowChecker) -> tuple[list[Example], list[Example], dict]:
    """The train and test Examples, and the rows counted so far. With ``drop_after_split`` every row read is
    split first, as the reference did (a bad row dropped first would shift every later one), and invalid
    rows are then set aside from either split; otherwise invalid rows go before the split."""
    where = checker.where
    if d.invalid_rows == "drop_after_split":
        if len(rows) < 2:
            raise DataError(f"{where}: {len(rows)} row(s): too few to split")
        train_i, test_i = _split_indices(len(rows), d, where)
        train = checker([rows[i] for i in train_i], "train")
        test = checker([rows[i] for i in test_i], "test")
        if not train:
            raise DataError(f"{where}: no usable rows in the training split")
        counts: dict[str, Any] = {
            "read": len(rows),
            "train_split": len(train_i),
            "test_split": len(test_i),
            "invalid": len(checker.rejected),
            "invalid_train": len(train_i) - len(train),
            "invalid_test": len(test_i) - len(test),
            "valid": len(train) + len(test),
        }
        return train, test, counts
    examples = checker(rows)
    if not examples:
        raise DataError(f"{where}: no usable rows")
    train_i, test_i = _split_indices(len(examples), d, where)
    train = [examples[i] for i in train_i]
    test = [examples[i] for i in test_i]
    counts = {
        "read": len(rows),
        "invalid": len(checker.rejected),
        "valid": len(examples),
        "train_split": len(train),
        "test_split": len(test),
    }
    return train, test, counts


def _dedupe(train: list[Example], counts: dict) -> list[Example]:
    seen: set[str] = set()
    kept = []
    for ex in train:
        key = example_key(ex)
        if key not in seen:
            seen.add(key)
            kept.append(ex)
    counts["duplicates_removed"] = len(train) - len(kept)
    counts["after_dedupe"] = len(kept)
    return kept


def _decontaminate(
    train: list[Example], test: list[Example], recipe: Recipe, counts: dict
) -> tuple[list[Example], list[dict]]:
    """The training rows that share no n-gram with ``data.decontaminate``'s sources, and the ones dropped."""
    d = recipe.data
    contaminated: list[dict] = []
    if not d.decontaminate:
        return train, contaminated
    counts["decontaminated"] = {}
    for name in d.decontaminate:
        # Against the test split, prompts are compared with prompts: answers share code idioms
        # ("for i in range(len(arr))") that say nothing about a leaked task.
        if name == "test":
            index = NgramIndex([_prompt_text(ex) for ex in test], d.decontamination_ngram)
        else:
            index = NgramIndex(_benchmark_texts(name, recipe), d.decontamination_ngram)
        kept = []
        for ex in train:
            hit = index.match(_prompt_text(ex) if name == "test" else _all_text(ex))
            if hit is None:
                kept.append(ex)
            else:
                contaminated.append({"row": ex.row, "against": name, "overlap": hit})
        counts["decontaminated"][name] = len(train) - len(kept)
        train = kept
    counts["after_decontamination"] = len(train)
    return train, contaminated


def _tokenize_train(
    train: list[Example], tokenizer, recipe: Recipe, turn_end, checker: _RowChecker, skip_invalid: bool, counts: dict
) -> tuple[list[dict], int]:
    """The training records (rows too long per ``data.too_long``, or left with no trained token, left out)
    and how many were truncated."""
    d = recipe.data
    records = []
    truncated = dropped = untrained = 0
    for ex in train:
        text = render(tokenizer, ex.messages)
        tok = tokenize_example(tokenizer, recipe, ex.messages, text, turn_end)
        if tok.truncated and d.too_long != "truncate":
            reason = f"{tok.full_length} tokens, longer than data.max_length {d.max_length}"
            if d.too_long == "error" and not skip_invalid:
                raise DataError(
                    f"{checker.where}, row {ex.row}, field 'text': {reason} "
                    "(set data.too_long to truncate or drop, or use --skip-invalid)"
                )
            if d.too_long == "error":
                checker.rejected.append({"row": ex.row, "field": "text", "reason": reason})
            dropped += 1
            continue
        if all(label == IGNORE_INDEX for label in tok.labels):
            untrained += 1
            continue
        truncated += tok.truncated
        records.append(_example_record(ex, tok, text))
    if not records:
        raise DataError(f"{checker.where}: the training split is empty after filtering ({counts})")
    counts.update(too_long_dropped=dropped, no_trained_tokens=untrained)
    return records, truncated


def _tokenize_test(test: list[Example], tokenizer, recipe: Recipe, turn_end) -> tuple[list[dict], int]:
    """Every test row, truncated when too long (for the evaluation loss only), and how many were."""
    records, truncated = [], 0
    for ex in test:
        text = render(tokenizer, ex.messages)
        tok = tokenize_example(tokenizer, recipe, ex.messages, text, turn_end)
        truncated += tok.truncated
        records.append(_example_record(ex, tok, text))
    return records, truncated


def _stats(
    recipe: Recipe, where: str, counts: dict, train_records: list[dict], test_records: list[dict],
    train_truncated: int, test_truncated: int,
) -> dict[str, Any]:  # fmt: skip
    train_lengths = [r["n_tokens"] for r in train_records]
    trained_tokens = sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in train_records)
    pack_share, pack_rows = packed_share(train_lengths, recipe.data.max_length)
    t = recipe.training
    return {
        "recipe": recipe.name,
        "source": where,
        "rows": counts,
        "tokens": {
            "train": length_summary(train_lengths),
            "test": length_summary([r["n_tokens"] for r in test_records]),
        },
        "truncated_share": {
            "train": train_truncated / len(train_records),
            "test": test_truncated / max(1, len(test_records)),
        },
        "trained_token_share": trained_tokens / sum(train_lengths),
        "padding": {
            "batch_size": t.batch_size,
            "padded_batches_share": round(padded_batch_share(train_lengths, t.batch_size, t.seed), 4),
            "packed_share": round(pack_share, 4),
            "packed_rows": pack_rows,
        },
    }


def _earlier_data(p: Path) -> bool:
    """data/ of this codetune run (also from before markers)."""
    return p.is_dir() and not p.is_symlink() and (p / "stats.json").is_file()


def _write_data(
    target: Path, train_records: list[dict], test_records: list[dict], rejected: list[dict],
    contaminated: list[dict], stats: dict,
) -> None:  # fmt: skip
    from .rundir import staged_dir

    with staged_dir(target, "data", overwrite=True, ours=_earlier_data, what="data folder") as staging:
        _write_split(staging / "train.parquet", train_records)
        _write_split(staging / "test.parquet", test_records)
        if rejected:
            write_jsonl(staging / "rejected.jsonl", rejected)
        if contaminated:
            write_jsonl(staging / "decontaminated.jsonl", contaminated)
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def load_split(run_dir: Path, split: str):
    """A prepared split as a ``datasets.Dataset``."""
    import datasets

    path = Path(run_dir) / DATA_DIR / f"{split}.parquet"
    if not path.is_file():
        raise RecipeError(f"{path} is missing: run `codetune prepare` for this run directory first")
    return datasets.Dataset.from_parquet(str(path))
