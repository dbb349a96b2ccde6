"""``codetune merge`` and ``codetune export``: a fine-tune as a plain model folder, and as GGUF.

``FORMATS`` is the registry of export formats: one entry per format says what it writes, its
output types and which model families it supports. ``codetune export --format`` takes its names
from it, and a wrong name or output type is refused naming the allowed ones.

Merging reloads the base model *unquantized* (bf16 by default) and folds the adapter into it. It
never merges into 4-bit weights: that would round the adapter's small updates away. Both write
through ``codetune.rundir``'s staging: an existing output is replaced only with ``overwrite`` and
only when codetune wrote it; the run itself and the current directory are never a target.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .data import known_trained_ids
from .errors import InputError
from .gguf_export import OUTTYPES as GGUF_OUTTYPES
from .recipe import load_recipe
from .rundir import (
    HELDOUT_RECORD,
    MERGE_RECORD,
    MERGED_RECIPE,
    RunDir,
    check_target,
    is_gguf_file,
    ours_or_legacy,
    read_marker,
    staged_dir,
)

MERGED = RunDir.MERGED


def merge(
    run_dir: Path, out_dir: Path | None = None, *, dtype: str = "bfloat16", overwrite: bool = False, log=print
) -> Path:
    """Base (unquantized, ``dtype``) + adapter -> one model folder with safetensors, tokenizer, a
    generation config that stops on every stop token of the recipe (``<|end|>`` included) and the run's
    recipe (``MERGED_RECIPE``), whose generation and evaluation settings then apply to the folder."""
    from .model import load_tokenizer, merged_model, stop_token_ids

    rd = RunDir(run_dir)
    adapter = rd.require_adapter()
    out_dir = Path(out_dir) if out_dir else rd.merged
    rules = dict(overwrite=overwrite, protect=[rd.path], ours=ours_or_legacy("merged", MERGE_RECORD))
    check_target(out_dir, "merged", what="--out", **rules)  # before the model loads
    recipe = load_recipe(rd.recipe_file)

    model = merged_model(recipe, adapter, dtype=dtype)
    tokenizer = load_tokenizer(recipe)
    stops = stop_token_ids(tokenizer, recipe.generation.stop_tokens)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.config.use_cache = True

    # the marker records the adapter it was made from: export rebuilds a merged/ made from another
    fingerprint = {"adapter_sha256": rd.adapter_fingerprint()}
    with staged_dir(out_dir, "merged", what="--out", meta=fingerprint, **rules) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MERGE_RECORD).write_text(
            json.dumps(
                {"run_dir": str(rd.path), "recipe": recipe.name, "base": recipe.model.name_or_path, "dtype": dtype},
                indent=2,
            )
            + "\n"
        )
        _write_heldout_record(rd, staging)
        # its run's settings (generation, evaluation): eval, generate and serve on the folder use them
        (staging / MERGED_RECIPE).write_text(recipe.to_yaml(), encoding="utf-8")
    log(f"merged {recipe.model.name_or_path} + {adapter} ({dtype}) -> {out_dir}")
    return out_dir


def _write_heldout_record(rd: RunDir, folder: Path) -> None:
    """The executable tasks the run trained on, so that evaluating the merged folder alone still leaves
    them out of the starter suites (it has no data/ of its own). No record without the run's training
    split: eval then says the starter scores are not known to be held out."""
    trained = known_trained_ids(rd.path)
    if trained is None:
        return
    record = {
        "trained_task_ids": sorted(trained),
        "from": str(rd.split("train").resolve()),
        "adapter_sha256": rd.adapter_fingerprint(),
    }
    (folder / HELDOUT_RECORD).write_text(json.dumps(record, indent=2) + "\n")


@dataclass(frozen=True)
class ExportFormat:
    """One way to export a fine-tune."""

    name: str
    writes: str  # what it writes, for --help and the docs
    outtypes: tuple[str, ...]  # the first is the default
    # The model families it supports; None: every model, unknown architectures included.
    families: Callable[[], list[str]] | None
    default_out: Callable[[RunDir, str], Path]
    # (run_dir, out, outtype, overwrite, log) -> what it wrote
    write: Callable[..., Path]

    @property
    def default_outtype(self) -> str:
        return self.outtypes[0]

    def supported_families(self) -> str:
        return "every model family" if self.families is None else ", ".join(self.families())


def _gguf_families() -> list[str]:
    from .families import gguf_families

    return gguf_families()


def _write_merged(run_dir: Path, out: Path, outtype: str, overwrite: bool, log) -> Path:
    return merge(run_dir, out, dtype=outtype, overwrite=overwrite, log=log)


def _write_gguf(run_dir: Path, out: Path, outtype: str, overwrite: bool, log) -> Path:
    """Merge (or reuse ``RUN_DIR/merged`` when it was made from the current adapter), then write GGUF."""
    from .gguf_export import export_gguf

    rd = RunDir(run_dir)
    check_target(out, "gguf", overwrite=overwrite, protect=[rd.path], ours=is_gguf_file, what="--out")
    made_from = (read_marker(rd.merged) or {}).get("adapter_sha256")
    if not (rd.merged / "config.json").is_file() or made_from != rd.adapter_fingerprint():
        if rd.merged.exists():
            log(f"{rd.merged} was not made from the current adapter: merging again")
        merge(rd.path, rd.merged, overwrite=rd.merged.exists(), log=log)
    return export_gguf(rd.merged, out, outtype=outtype, overwrite=overwrite, log=log)


FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat(
            name="gguf",
            writes="one GGUF file for llama.cpp and Ollama (merged first)",
            outtypes=GGUF_OUTTYPES,
            families=_gguf_families,
            default_out=lambda rd, outtype: rd.path / f"model-{outtype}.gguf",
            write=_write_gguf,
        ),
        ExportFormat(
            name="merged",
            writes="a Hugging Face model folder: base + adapter in safetensors, with the tokenizer",
            outtypes=("bfloat16", "float16", "float32"),
            families=None,
            default_out=lambda rd, outtype: rd.merged,
            write=_write_merged,
        ),
    )
}


def export_format(name: str) -> ExportFormat:
    """The registry's entry for ``name``; an unknown name is refused naming the known ones."""
    if name not in FORMATS:
        raise InputError(f"--format {name!r}: choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def export(
    run_dir: Path,
    out_file: Path | None = None,
    *,
    format: str = "gguf",
    outtype: str | None = None,
    overwrite: bool = False,
    log=print,
) -> Path:
    """``codetune export``: the run in one of the registry's formats (default ``gguf``: merge, then write
    GGUF; ``RUN_DIR/merged`` is reused only when it was made from the current adapter, whose SHA-256
    its marker records)."""
    fmt = export_format(format)
    outtype = outtype or fmt.default_outtype
    if outtype not in fmt.outtypes:
        raise InputError(f"--outtype {outtype!r} for --format {fmt.name}: choose one of {', '.join(fmt.outtypes)}")
    rd = RunDir(run_dir)
    rd.require_adapter()
    out = Path(out_file) if out_file else fmt.default_out(rd, outtype)
    return fmt.write(rd.path, out, outtype, overwrite, log)


__all__ = ["FORMATS", "MERGED", "ExportFormat", "export", "export_format", "merge"]
