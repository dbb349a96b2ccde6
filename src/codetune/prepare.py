"""The prepare stage: read a source, check every row, format chats, split, deduplicate, decontaminate,
tokenize with the right loss mask, and write it all to ``RUN_DIR/data``.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import (
    IGNORE_INDEX,
    Example,
    RowProblem,
    _Bad,
    packed_share,
    read_source,
    row_to_example,
    write_jsonl,
)
from .errors import DataError, RecipeError
from .families import family_for_source
from .model import load_tokenizer
from .recipe import Recipe, data_fingerprint, save_recipe
from .rundir import RunDir, staged_dir


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
    if recipe.data.ignore_pad_token_labels:
        # transformers 4.40's collator: labels[labels == pad_token_id] = -100, inside a text as in the padding
        trained = [keep and t != tokenizer.pad_token_id for t, keep in zip(ids, trained, strict=True)]
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
    return Tokenized(ids, labels, truncated, full)


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


def _write_split(path: Path, records: list[dict]) -> None:
    import datasets

    if records:
        datasets.disable_progress_bars()
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        path.write_bytes(b"")


def prepare(
    recipe: Recipe, run_dir: Path, *, skip_invalid: bool = False, overwrite: bool = False, log=print, tokenizer=None
) -> PrepareResult:
    """Write ``RUN_DIR/data/{train,test}.parquet`` and ``stats.json`` for ``recipe``.

    The steps, in order: read the rows, check and format them and split them (``_check_and_split``),
    deduplicate and decontaminate the training split, tokenize both splits, count, write. Everything is
    written to a staging folder first and moved into place at the end, so a failure never leaves a
    half-written ``data/`` that later stages would take for complete. A run that has trained is left
    alone unless ``overwrite`` (its training is then deleted, since it would no longer match the data).
    """
    rd = RunDir(run_dir).check_usable()  # a foreign folder fails here, before any work
    retrain = rd.check_mutable(overwrite, "preparing its data again")
    d = recipe.data
    tokenizer = tokenizer or load_tokenizer(recipe)  # fails on a bad tokenizer before any data is read
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

    rd.ensure()  # created only now: a source that fails to read leaves no run directory behind
    _write_data(rd.data, train_records, test_records, checker.rejected, contaminated, stats, data_fingerprint(recipe))
    if retrain:
        log(f"--overwrite: deleted the earlier training of {run_dir}, which no longer matches its data")
        rd.clear_training()
    save_recipe(recipe, run_dir)
    if checker.rejected:
        log(f"set aside {len(checker.rejected)} invalid rows -> {rd.rejected}")
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
    return p.is_dir() and not p.is_symlink() and (p / RunDir.STATS).is_file()


def _write_data(
    target: Path, train_records: list[dict], test_records: list[dict], rejected: list[dict],
    contaminated: list[dict], stats: dict, fingerprint: str,
) -> None:  # fmt: skip
    """data/, with the fingerprint of the recipe that made it in its marker (``train.data_matches`` checks it)."""
    meta = {"recipe_sha256": fingerprint}
    with staged_dir(target, "data", overwrite=True, ours=_earlier_data, what="data folder", meta=meta) as staging:
        _write_split(staging / RunDir.split_file("train"), train_records)
        _write_split(staging / RunDir.split_file("test"), test_records)
        if rejected:
            write_jsonl(staging / RunDir.REJECTED, rejected)
        if contaminated:
            write_jsonl(staging / RunDir.DECONTAMINATED, contaminated)
        (staging / RunDir.STATS).write_text(json.dumps(stats, indent=2) + "\n")
