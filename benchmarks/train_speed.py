"""Training speed: the reference stack against codetune's default path, side by side, in one invocation.

Both paths train the same small Phi-3 (hidden 256, 4 layers, the real 32,064-token vocabulary and
Phi-3 tokenizer, random weights, 4-bit NF4 + LoRA) on the same MBPP rows, one epoch each, each in a
fresh child process so that peak RSS is its own:

  reference   TRL's SFTTrainer configured as the card's run: max length 512, padded batches of 4 x 8
              accumulation, no packing, loss on all tokens, TRL's default loss path; the
              phi3-mini-python-seed recipe's format, LoRA targets, optimizer and schedule.
  codetune    ``codetune.train.train`` with the phi3-mini-python recipe, untouched except for the
              model, the data source and one epoch.

``--ablation`` adds variants that each change one thing: the reference with bf16 autocast, the seed
recipe trained by codetune's engine (same recipe, same learning, codetune's loss path and precision),
and codetune without bf16 or without packed rows (TRL's flattened padding-free batches instead).

Per variant: non-padding tokens per second, padding share, peak RSS, seconds per optimizer step, and
the loss on a fixed held-out batch after training on the same rows: the code tokens of the first 32
test rows' answers, scored with the reference's prompts and with codetune's (the same token ids in
each column for every variant). ``--scaling`` adds a table of wall time against rows and max length.

    python benchmarks/train_speed.py                         # the main comparison (needs ../shared)
    python benchmarks/train_speed.py --ablation --scaling    # what BENCHMARKS.md shows
    python benchmarks/train_speed.py --rows 64 --variants codetune   # a quick look at one path

Writes benchmarks/results/train_speed.json (or --out) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "phi3-mini-4k-instruct"
TOKENIZER_2024_05 = TOKENIZER / "revision-2024-05"
MBPP = SHARED / "data" / "mbpp" / "mbpp.jsonl"
SMALL_PHI3 = dict(
    hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8
)
HELDOUT_ROWS = 32
PATHS = {"reference": "phi3-mini-python-seed", "codetune": "phi3-mini-python"}


# ---------------------------------------------------------------------------------------
# Shared set-up (parent process)


def build_assets(work: Path) -> tuple[Path, Path]:
    """The small Phi-3 with random weights, and MBPP in the reference dataset's alpaca schema."""
    model_dir, source = work / "phi3-small-random", work / "mbpp_alpaca.jsonl"
    if not (model_dir / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM

        from codetune.model import phi3_mini_config

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(phi3_mini_config(**SMALL_PHI3), dtype=torch.bfloat16)
        model.save_pretrained(model_dir)
    if not source.is_file():
        with source.open("w") as fh:
            for line in MBPP.read_text().splitlines():
                r = json.loads(line)
                row = {"instruction": r["text"], "input": "", "output": r["code"].replace("\r\n", "\n")}
                fh.write(json.dumps(row) + "\n")
    return model_dir, source


def overrides(path: str, model_dir: Path, source: Path, max_length: int, *, answer_labels: bool = False) -> list[str]:
    tokenizer = TOKENIZER_2024_05 if path == "reference" else TOKENIZER
    out = [
        f"model.name_or_path={model_dir}",
        f"tokenizer.name_or_path={tokenizer}",
        f"data.source={source}",
        f"data.max_length={max_length}",
        f"evaluation.mbpp_source={MBPP}",
        "training.epochs=1",
        "training.eval_steps=null",
        "training.save_strategy=no",
        "training.logging_steps=1",
    ]
    if path == "codetune":
        out.append("data.decontaminate=[test]")  # the rows are MBPP: decontaminating against MBPP leaves none
    if answer_labels:
        out.append("data.loss_on=answer")
    return out


def prepare_data(work: Path, model_dir: Path, source: Path, max_length: int) -> dict[str, Path]:
    """Prepared data per path (and the reference format with answer-only labels, for the held-out loss)."""
    from codetune.prepare import prepare
    from codetune.recipe import load_recipe

    dirs = {}
    for key, path, answer in [
        ("reference", "reference", False),
        ("codetune", "codetune", False),
        ("reference-heldout", "reference", True),
    ]:
        d = work / f"data-{key}-{max_length}"
        if not (d / "data" / "stats.json").is_file():
            prepare(
                load_recipe(PATHS[path], overrides(path, model_dir, source, max_length, answer_labels=answer)),
                d,
                log=lambda *_: None,
            )
        dirs[key] = d
    return dirs


# ---------------------------------------------------------------------------------------
# Child process: one path, one configuration


def _count_collated_batches(stats: dict) -> None:
    """Count real and padded positions in every batch the collators build (TRL's and codetune's)."""
    from trl.trainer import sft_trainer

    cls = sft_trainer.DataCollatorForLanguageModeling
    original = cls.torch_call

    def torch_call(self, examples):
        out = original(self, examples)
        ids = out["input_ids"]
        stats["positions"] += ids.numel()
        stats["real_tokens"] += int(out["attention_mask"].sum()) if "attention_mask" in out else ids.numel()
        stats["batches"] += 1
        return out

    cls.torch_call = torch_call

    from codetune.train import REAL_TOKENS, PackedRowsCollator

    packed_call = PackedRowsCollator.__call__

    def call(self, examples):
        out = packed_call(self, examples)
        stats["positions"] += out["input_ids"].numel()
        stats["real_tokens"] += int(out[REAL_TOKENS])
        stats["batches"] += 1
        return out

    PackedRowsCollator.__call__ = call

    from codetune.train import PaddedRowsCollator

    padded_call = PaddedRowsCollator.__call__

    def padded(self, examples):
        out = padded_call(self, examples)
        stats["positions"] += out["input_ids"].numel()
        stats["real_tokens"] += int(out["attention_mask"].sum())
        stats["batches"] += 1
        return out

    PaddedRowsCollator.__call__ = padded


class StepClock:
    """A TrainerCallback (duck-typed) timing every optimizer step against the collators' real-token count."""

    def __init__(self, stats: dict):
        self.stats, self.marks = stats, []

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kw):
        self.marks.append((time.perf_counter(), self.stats["real_tokens"]))

    def steady(self) -> tuple[float, float]:
        """(non-padding tokens/s, s per step) from the end of the first step on: warm-up left out."""
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        steps = len(self.marks) - 1
        return (n1 - n0) / (t1 - t0), (t1 - t0) / steps


def _rows_dir(data_dir: Path, run_dir: Path, rows: int) -> None:
    """A run directory whose training split is the first ``rows`` prepared rows."""
    import shutil

    from codetune.data import load_split

    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    train = load_split(data_dir, "train")
    if rows > len(train):
        raise SystemExit(f"--rows {rows}: only {len(train)} training rows are prepared")
    train.select(range(rows)).to_parquet(str(run_dir / "data" / "train.parquet"))
    for name in ("test.parquet", "stats.json"):
        shutil.copy(data_dir / "data" / name, run_dir / "data" / name)
    shutil.copy(data_dir / "recipe.yaml", run_dir / "recipe.yaml")


def heldout_token_losses(recipe, adapter_dir: Path, heldout_dirs: dict[str, str]) -> tuple[dict, dict]:
    """(target id, cross-entropy) for the code tokens of the first held-out rows' answers, in each prompt
    format, for the trained model and for its base (the same model with the adapter switched off).

    The formats' special tokens (<|end|>, </s>, <|endoftext|>) are left out; the parent scores every
    variant on the targets both formats share.
    """
    import torch
    import torch.nn.functional as F
    from peft import PeftModel

    from codetune.data import load_split
    from codetune.model import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(recipe)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)))
    model = PeftModel.from_pretrained(load_base_model(recipe), str(adapter_dir)).eval()
    rows = {f: load_split(Path(d), "test").select(range(HELDOUT_ROWS)) for f, d in heldout_dirs.items()}

    def score() -> dict[str, list[list[tuple[int, float]]]]:
        out = {}
        for fmt, split in rows.items():
            out[fmt] = []
            for row in split:
                labels = torch.tensor(row["labels"][1:])
                logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].float()
                keep = (labels != -100) & ~torch.isin(labels, special)
                losses = F.cross_entropy(logits[keep], labels[keep], reduction="none")
                out[fmt].append(list(zip(labels[keep].tolist(), losses.tolist(), strict=True)))
        return out

    with torch.no_grad():
        trained = score()
        with model.disable_adapter():
            base = score()
    return trained, base


def run_reference(recipe, run_dir: Path, *, bf16: bool, callbacks: list | None = None) -> dict:
    """TRL's SFTTrainer as the card's notebook drove it: padded batches, all tokens, TRL's loss path."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from codetune.data import load_split
    from codetune.model import load_base_model, load_tokenizer, peft_lora_config

    t = recipe.training
    tokenizer = load_tokenizer(recipe)
    # Already tokenized as the notebook's TRL did (double <s>, eos): TRL trains on input_ids as given.
    train = load_split(run_dir, "train").select_columns(["input_ids"])
    cuda = torch.cuda.is_available()
    model = load_base_model(recipe, device_map={"": 0} if cuda else None)
    args = SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        max_length=recipe.data.max_length,
        packing=False,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        optim=t.optimizer,
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        gradient_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        bf16=bf16,
        seed=t.seed,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_lora_config(recipe.lora),
        callbacks=callbacks,
    )
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer.save_model(str(run_dir / "adapter"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "precision": {"no": "fp32"}.get(trainer.accelerator.mixed_precision, trainer.accelerator.mixed_precision),
        "wall_s": wall,
        "steps": trainer.state.global_step,
        "peak_rss": peak,
        "last_train_loss": losses[-1],
    }


def run_codetune(recipe, run_dir: Path, callbacks: list | None = None) -> dict:
    import torch

    from codetune.pipeline import train
    from codetune.train import resolve_precision

    result = train(recipe, run_dir, callbacks=callbacks)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bf16, _ = resolve_precision(recipe, cuda=torch.cuda.is_available())
    return {
        "precision": "bf16" if bf16 else "fp32",
        "wall_s": result.summary["wall_s_this_session"],
        "steps": result.global_step,
        "peak_rss": peak,
        "last_train_loss": result.train_loss,
    }


# Variants: the two paths the issue names, and single-change ablations that show where the speed comes from.
VARIANTS = {
    "reference": {"path": "reference"},
    "reference +bf16": {"path": "reference", "bf16": True},
    "seed recipe on codetune": {"path": "reference", "engine": "codetune"},
    "codetune": {"path": "codetune"},
    "codetune -bf16": {"path": "codetune", "set": ["training.precision=fp32"]},
    "codetune -rows": {"path": "codetune", "flatten": True},
    # not a speed change: the recipe's earlier default, twice the tokens per step and half the steps
    "codetune accumulation 4": {"path": "codetune", "set": ["training.gradient_accumulation_steps=4"]},
}


def child(args) -> None:
    import torch

    from codetune.recipe import load_recipe, save_recipe

    torch.set_num_threads(args.threads or torch.get_num_threads())
    spec = json.loads(args.child)
    variant = VARIANTS[spec["variant"]]
    path = variant["path"]
    data_dir, heldout_dirs, run_dir = Path(spec["data_dir"]), spec["heldout_dirs"], Path(spec["run_dir"])
    recipe = load_recipe(PATHS[path], spec["overrides"] + variant.get("set", []))
    _rows_dir(data_dir, run_dir, spec["rows"])
    save_recipe(recipe, run_dir)
    if variant.get("flatten"):
        # TRL's padding-free collator: the whole batch as one flattened row
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        import codetune.train

        codetune.train._collator = lambda r, tok: DataCollatorForLanguageModeling(tok.pad_token_id, padding_free=True)
    stats = {"positions": 0, "real_tokens": 0, "batches": 0}
    _count_collated_batches(stats)
    if variant.get("engine", "trl" if path == "reference" else "codetune") == "trl":
        out = run_reference(recipe, run_dir, bf16=variant.get("bf16", False))
    else:
        out = run_codetune(recipe, run_dir)
    out.update(stats)
    if spec["heldout"]:
        # both prompt formats, so that each column of the table scores both paths on the same token ids
        out["heldout"], out["heldout_base"] = heldout_token_losses(recipe, run_dir / "adapter", heldout_dirs)
    Path(spec["result"]).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------
# Parent: run the variants, print and write the tables


def run_variant(
    name: str,
    work: Path,
    model_dir: Path,
    source: Path,
    rows: int,
    max_length: int,
    *,
    heldout: bool,
    threads: int | None,
) -> dict:
    import shutil

    path = VARIANTS[name]["path"]
    dirs = prepare_data(work, model_dir, source, max_length)
    tag = f"{name.replace(' ', '').replace('+', 'plus').replace('-', 'minus')}-r{rows}-L{max_length}"
    run_dir, result = work / "runs" / tag, work / "runs" / f"{tag}.json"
    shutil.rmtree(run_dir, ignore_errors=True)
    spec = {
        "variant": name,
        "data_dir": str(dirs[path]),
        "heldout_dirs": {"reference": str(dirs["reference-heldout"]), "codetune": str(dirs["codetune"])},
        "run_dir": str(run_dir),
        "rows": rows,
        "overrides": overrides(path, model_dir, source, max_length),
        "heldout": heldout,
        "result": str(result),
    }
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)] + (["--threads", str(threads)] if threads else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{name} (rows {rows}, max length {max_length}) failed with exit {proc.returncode}")
    r = json.loads(result.read_text())
    r.update(variant=name, rows=rows, max_length=max_length)
    r["real_tokens_per_s"] = r["real_tokens"] / r["wall_s"]
    r["padding_pct"] = 100 * (1 - r["real_tokens"] / r["positions"])
    r["s_per_step"] = r["wall_s"] / r["steps"]
    r["peak_rss_gib"] = r["peak_rss"] / 2**30
    print(
        f"  {name:17s} rows {rows:4d} max length {max_length:4d}: {r['real_tokens_per_s']:7,.0f} non-padding "
        f"tokens/s, {r['wall_s']:6.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB",
        flush=True,
    )
    return r


def score_heldout(results: list[dict]) -> int:
    """Held-out loss of each variant, base and trained, in each prompt format, over the same targets: per row,
    the code tokens both formats share (the common prefix of their targets). Returns how many targets that is."""
    with_heldout = [r for r in results if "heldout" in r]
    if not with_heldout:
        return 0
    ref_rows, ct_rows = with_heldout[0]["heldout_base"]["reference"], with_heldout[0]["heldout_base"]["codetune"]
    shared = []
    for ra, rb in zip(ref_rows, ct_rows, strict=True):
        k = 0
        while k < min(len(ra), len(rb)) and ra[k][0] == rb[k][0]:
            k += 1
        shared.append(k)
    for r in with_heldout:
        for key in ("heldout", "heldout_base"):
            for fmt, rows in r.pop(key).items():
                total = sum(loss for row, k in zip(rows, shared, strict=True) for _, loss in row[:k])
                r[f"{key}_{fmt}"] = total / sum(shared)
    return sum(shared)


def fmt_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = [
        "| " + " | ".join(c[1] for c in columns) + " |",
        "|" + "|".join("---" if c[2] == "s" else "---:" for c in columns) + "|",
    ]
    for r in rows:
        cells = []
        for key, _, f in columns:
            v = r.get(key)
            cells.append("—" if v is None else (str(v) if f == "s" else format(v, f)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MAIN_COLUMNS = [
    ("variant", "path", "s"),
    ("precision", "precision", "s"),
    ("real_tokens", "non-padding tokens", ",d"),
    ("padding_pct", "padding %", ".1f"),
    ("real_tokens_per_s", "non-padding tokens/s", ",.0f"),
    ("speedup", "vs reference", ".2f"),
    ("steps", "optimizer steps", "d"),
    ("s_per_step", "s / step", ".2f"),
    ("peak_rss_gib", "peak RSS GiB", ".2f"),
    ("heldout_base_reference", "held-out loss, base, ref. prompts", ".4f"),
    ("heldout_reference", "trained, ref. prompts", ".4f"),
    ("heldout_base_codetune", "base, codetune prompts", ".4f"),
    ("heldout_codetune", "trained, codetune prompts", ".4f"),
]
SCALING_COLUMNS = [
    ("rows", "rows", "d"),
    ("max_length", "max length", "d"),
    ("variant", "path", "s"),
    ("real_tokens", "non-padding tokens", ",d"),
    ("padding_pct", "padding %", ".1f"),
    ("steps", "optimizer steps", "d"),
    ("wall_s", "train wall s", ".1f"),
    ("real_tokens_per_s", "non-padding tokens/s", ",.0f"),
    ("speedup", "vs reference", ".2f"),
]


def add_speedups(results: list[dict]) -> None:
    for r in results:
        ref = next(
            (
                x
                for x in results
                if x["variant"] == "reference" and x["rows"] == r["rows"] and x["max_length"] == r["max_length"]
            ),
            None,
        )
        r["speedup"] = r["real_tokens_per_s"] / ref["real_tokens_per_s"] if ref else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=450, help="training rows (MBPP has 925 after the 5%% test split)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--variants", default="reference,codetune", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--ablation", action="store_true", help="run every variant in the main table")
    ap.add_argument("--scaling", action="store_true", help="also time rows 225/450/900 and max length 256/512/1024")
    ap.add_argument("--workdir", default=None, help="keep the model, data and runs here (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_speed.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    for need in (TOKENIZER, TOKENIZER_2024_05, MBPP):
        if not need.exists():
            raise SystemExit(f"{need} is missing: this benchmark reads the Phi-3 tokenizer and MBPP from ../shared")
    variants = list(VARIANTS) if args.ablation else args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import tempfile

    import torch

    work = Path(args.workdir or tempfile.mkdtemp(prefix="codetune-train-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, source = build_assets(work)
    print(f"work dir {work}", flush=True)

    def one(name, rows, max_length, heldout):
        return run_variant(name, work, model_dir, source, rows, max_length, heldout=heldout, threads=args.threads)

    main_rows = [one(v, args.rows, args.max_length, True) for v in variants]
    targets = score_heldout(main_rows)
    add_speedups(main_rows)
    report = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "model": {
            "architecture": "Phi3ForCausalLM",
            **SMALL_PHI3,
            "vocab_size": 32064,
            "weights": "random, seed 0",
            "quantization": "4-bit NF4, double quant (bitsandbytes)",
        },
        "command": " ".join(["python", "benchmarks/train_speed.py"] + sys.argv[1:]),
        "heldout": {"rows": HELDOUT_ROWS, "targets": targets},
        "main": main_rows,
    }
    by = {r["variant"]: r for r in main_rows}
    print()
    print(fmt_table(main_rows, MAIN_COLUMNS))
    if {"reference", "codetune"} <= by.keys():
        ref, ct = by["reference"], by["codetune"]
        report["ratios"] = {
            "non_padding_tokens_per_s": ct["real_tokens_per_s"] / ref["real_tokens_per_s"],
            "peak_rss": ct["peak_rss"] / ref["peak_rss"],
            "heldout_loss_delta_reference_prompts": ct["heldout_reference"] - ref["heldout_reference"],
            "heldout_loss_delta_codetune_prompts": ct["heldout_codetune"] - ref["heldout_codetune"],
        }
        r = report["ratios"]
        print(
            f"\ncodetune / reference: {r['non_padding_tokens_per_s']:.2f}x non-padding tokens/s, "
            f"{r['peak_rss']:.2f}x peak RSS; held-out loss codetune - reference: "
            f"{r['heldout_loss_delta_reference_prompts']:+.4f} on the reference's prompts, "
            f"{r['heldout_loss_delta_codetune_prompts']:+.4f} on codetune's ({targets} code tokens of "
            f"{HELDOUT_ROWS} test rows)"
        )
    if args.scaling:
        grid = [
            (225, args.max_length),
            (args.rows, args.max_length),
            (900, args.max_length),
            (args.rows, 256),
            (args.rows, 1024),
        ]
        done = {(r["variant"], r["rows"], r["max_length"]): r for r in main_rows}
        scaling = []
        for rows, max_length in grid:
            for v in ("reference", "codetune"):
                scaling.append(done.get((v, rows, max_length)) or one(v, rows, max_length, False))
        add_speedups(scaling)
        report["scaling"] = scaling
        print()
        print(fmt_table(scaling, SCALING_COLUMNS))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def machine() -> str:
    import torch

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{name}, {os.cpu_count()} CPUs, {mem:.0f} GiB, torch {torch.__version__}"


if __name__ == "__main__":
    main()
