"""``codetune train``: QLoRA fine-tuning with the HF Trainer, on a CUDA GPU or a CPU.

The stage reads like a torchtune recipe: ``setup`` (checks, data, model, trainer), ``train``,
``save`` (adapter, loss table, plot), ``cleanup``. The Trainer does the loop; codetune keeps
what it adds visible here: the packed-rows collator, the lean loss path (``codetune.loss``: chunked
cross-entropy over the trained positions only, no per-token side metrics), the non-finite-loss
guard, metrics and progress.

Run directory after training::

    recipe.yaml          the resolved recipe
    data/                from codetune prepare
    checkpoints/         checkpoint-N/ on the recipe's cadence (resumable)
    metrics.jsonl        one line per log: step, epoch, train/eval loss, lr, tokens, tokens/s, elapsed
    adapter/             the final LoRA adapter in PEFT's layout, with the tokenizer
    loss_table.md        step, training loss, validation loss (the reference card's table)
    loss.png             the loss curves
    train_summary.json   steps, final losses, tokens, wall time, trainable parameters
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import load_split
from .errors import CodetuneError
from .loss import add_lean_loss
from .model import (
    attach_lora,
    check_chat_template,
    check_init_from,
    prompt_boundary,
    check_lora_targets_from_config,
    check_model_source,
    check_sharded_qlora,
    flash_attention_2_unavailable,
    load_base_model,
    load_tokenizer,
    lora_in_bf16,
    sharded_mode,
    stop_token_ids,
)
from .recipe import Recipe, RecipeError, check_integrations, data_fingerprint, load_recipe
from .rundir import ADAPTER_CONFIG, RunDir, append_line, atomic_path, atomic_write, read_marker, staged_dir
from .runfiles import read_metrics
from .tiny import resolve_model_path


class NonFiniteLossError(CodetuneError, RuntimeError):
    def __init__(self, step: int, value: float, checkpoint: str | None):
        self.step, self.value, self.checkpoint = step, value, checkpoint
        keep = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint had been saved yet"
        super().__init__(
            f"training loss became {value} at step {step}; stopped before the optimizer applied it, {keep}. "
            "Lower training.learning_rate, raise training.warmup_ratio, or check the data."
        )


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    global_step: int
    train_loss: float | None
    eval_loss: float | None
    summary: dict[str, Any]


# ---------------------------------------------------------------------------------------
# Checks that run before the model loads


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def process_state():
    """accelerate's ``PartialState`` of this process, set up as the Trainer sets it up (``use_cpu`` without
    CUDA). Under ``accelerate launch`` on a machine without CUDA, a plain ``PartialState()`` finds no
    accelerator and calls every process the main one until the Trainer starts, so each would prepare the
    data and print its progress; with ``cpu=True`` the launch is DDP over CPU processes from the start."""
    from accelerate import PartialState

    return PartialState(cpu=not cuda_available())


def check_hardware(recipe: Recipe, cuda: bool) -> list[str]:
    """Refuse CUDA-only settings on a machine without CUDA; return notes for settings that degrade."""
    notes: list[str] = []
    if cuda:
        return notes
    problems = []
    if recipe.training.precision == "fp16":
        problems.append("training.precision fp16 needs a CUDA GPU: use --set training.precision=bf16 (or fp32)")
    for name in ("model", "training"):
        if getattr(recipe, name).attn_implementation == "flash_attention_2":
            problems.append(
                f"{name}.attn_implementation flash_attention_2 needs a CUDA GPU: use "
                f"--set {name}.attn_implementation=sdpa"
            )
    if problems:
        raise RecipeError("this machine has no CUDA GPU:\n  " + "\n  ".join(problems))
    if recipe.training.optimizer.startswith("paged_"):
        notes.append(
            f"training.optimizer {recipe.training.optimizer}: paging needs CUDA; on this CPU bitsandbytes "
            "runs it unpaged"
        )
    return notes


def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast beats fp32."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(recipe: Recipe, cuda: bool) -> tuple[bool, bool]:
    """(bf16, fp16) for the Trainer. 'auto' is what the reference notebook did, bf16 where the GPU has it,
    and on a CPU bf16 autocast where the CPU has bf16 instructions (2.7x faster matmuls measured here)."""
    import torch

    p = recipe.training.precision
    if p == "auto":
        if not cuda:
            return cpu_has_fast_bf16(), False
        bf16 = torch.cuda.is_bf16_supported()
        return bf16, not bf16
    return p == "bf16", p == "fp16"


def training_attention(recipe: Recipe, cuda: bool) -> tuple[str, str | None]:
    """The attention implementation the model trains with, and a note when flash-attention 2 was asked for
    "where it runs" (``flash_attention_2_or_sdpa``) and cannot run here: then sdpa, as the reference notebook
    chose on a GPU without bf16."""
    asked = recipe.training.attn_implementation or recipe.model.attn_implementation
    if asked != "flash_attention_2_or_sdpa":
        return asked, None
    why = flash_attention_2_unavailable(cuda)
    if why is None:
        return "flash_attention_2", None
    return "sdpa", f"training.attn_implementation flash_attention_2_or_sdpa: {why}, so training uses sdpa"


def data_matches(recipe: Recipe, run_dir: Path) -> bool:
    """The run's prepared data was made from this recipe's data, tokenizer and model settings: the recipe
    saved beside it says so, and so does the fingerprint prepare recorded inside data/ (data/ and
    recipe.yaml are two writes: a prepare killed between them leaves a pair that disagrees)."""
    rd = RunDir(run_dir)
    if not rd.stats.is_file() or not rd.recipe_file.is_file():
        return False
    old = load_recipe(rd.recipe_file)
    if (old.data, old.tokenizer, old.model) != (recipe.data, recipe.tokenizer, recipe.model):
        return False
    recorded = (read_marker(rd.data) or {}).get("recipe_sha256")
    return recorded is None or recorded == data_fingerprint(recipe)  # None: data/ from before the fingerprint


def _finished(rd: RunDir) -> TrainResult | None:
    """The result of a run whose adapter was saved at its last checkpoint's step (resuming it would train
    past its end), else None."""
    ckpts = rd.complete_checkpoints()
    path = rd.train_summary
    if not ckpts or not path.is_file() or not rd.adapter_config.is_file():
        return None
    summary = rd.read_train_summary() or {}  # checked: a damaged one is one error naming it
    if summary.get("global_step") != int(ckpts[-1].name.split("-")[-1]):
        return None
    return TrainResult(
        rd.path, rd.adapter, summary["global_step"], summary.get("last_train_loss"), summary.get("last_eval_loss"),
        summary,
    )


def check_fresh(run_dir: Path, overwrite: bool) -> bool:
    """True when ``run_dir`` holds an earlier training run that --overwrite allows to replace.

    Also refuses, before any work, a run directory codetune may not write (a foreign folder, a file)."""
    rd = RunDir(run_dir).check_usable()
    existing = bool(rd.complete_checkpoints()) or rd.adapter.exists()
    if existing and not overwrite:
        raise RecipeError(
            f"{run_dir} already holds a training run (checkpoints/ or adapter/): pass --resume to continue "
            "it, --overwrite to start over, or choose another --run-dir"
        )
    return existing


# ---------------------------------------------------------------------------------------
# Metrics and progress


def _read_metrics(path: Path) -> list[dict]:
    """The lines of metrics.jsonl, checked (runfiles' loader): a damaged line is one error naming it."""
    return read_metrics(path) or []


def _metrics_callback(run_dir: Path, console, epochs_per_pass: float = 1.0):
    from transformers import TrainerCallback

    class MetricsAndProgress(TrainerCallback):
        """Writes metrics.jsonl and shows progress: a live bar on a terminal, plain lines in a log."""

        def __init__(self):
            self.path = RunDir(run_dir).metrics
            self.progress = None
            self.task = None
            self.last: dict[str, Any] = {}

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.tokens0 = state.num_input_tokens_seen
            self.step0 = state.global_step
            rows = [r for r in _read_metrics(self.path) if r["step"] <= state.global_step]
            self.elapsed0 = (rows[-1].get("elapsed_s") or 0.0) if rows else 0.0
            if state.is_world_process_zero:
                # A resumed run rewinds the log to its checkpoint: steps past it are done again.
                atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in rows))
                if console is not None and console.is_terminal:
                    self.progress, self.task = _progress_bar(console, state)

        def _rate(self, state) -> tuple[float, float]:
            dt = time.perf_counter() - self.t0
            tokens = state.num_input_tokens_seen - self.tokens0
            return dt, (tokens / dt if dt > 0 else 0.0)

        def on_step_end(self, args, state, control, **kw):
            if self.progress is not None:
                _, rate = self._rate(state)
                self.progress.update(self.task, completed=state.global_step, info=_bar_info(self.last, rate))

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            if "train_loss" in logs:  # the Trainer's end-of-run summary, not a step log
                return
            dt, rate = self._rate(state)
            row = _metrics_row(state, logs, epochs_per_pass, rate, self.elapsed0 + dt)
            for key in ("train_loss", "learning_rate"):
                if row[key] is not None:
                    self.last[key] = row[key]
            append_line(self.path, json.dumps(row) + "\n")
            if self.progress is None and console is not None:
                console.print(_progress_line(state, row, self.step0, dt, rate), highlight=False)

        def on_train_end(self, args, state, control, **kw):
            if self.progress is not None:
                self.progress.stop()

    return MetricsAndProgress()


def _progress_bar(console, state):
    """A started live progress bar on the terminal, and its task."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    progress.start()
    task = progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")
    return progress, task


def _bar_info(last: dict[str, Any], rate: float) -> str:
    """The bar's text: the last logged loss and learning rate (a step's end has no logs of its own), the rate."""
    loss = last.get("train_loss")
    info = f"loss {loss:.4f}  " if loss is not None else ""
    return info + f"lr {last.get('learning_rate', 0):.2e}  {rate:,.0f} tok/s"


def _metrics_row(state, logs: dict, epochs_per_pass: float, rate: float, elapsed: float) -> dict:
    """One line of metrics.jsonl."""
    return {
        "step": state.global_step,
        # across-epoch windows give the Trainer all epochs as one pass: count real epochs
        "epoch": round((state.epoch or 0.0) * epochs_per_pass, 4),
        "train_loss": logs.get("loss"),
        "eval_loss": logs.get("eval_loss"),
        "learning_rate": logs.get("learning_rate"),
        "grad_norm": logs.get("grad_norm"),
        "tokens": state.num_input_tokens_seen,
        "tokens_per_s": round(rate, 1),
        "elapsed_s": round(elapsed, 2),
    }


def _progress_line(state, row: dict, step0: int, dt: float, rate: float) -> str:
    """A plain progress line for a log (no terminal); the eta from this session's steps only (a resumed run's
    earlier steps ran at another time)."""
    done = state.global_step - step0
    eta = (state.max_steps - state.global_step) * dt / done if done else float("nan")
    parts = [f"step {state.global_step}/{state.max_steps}"]
    if row["train_loss"] is not None:
        parts.append(f"loss {row['train_loss']:.4f}")
    if row["eval_loss"] is not None:
        parts.append(f"eval_loss {row['eval_loss']:.4f}")
    if row["learning_rate"] is not None:
        parts.append(f"lr {row['learning_rate']:.2e}")
    parts += [f"{rate:,.0f} tok/s", f"eta {eta:.0f}s" if math.isfinite(eta) else "eta ?"]
    return " | ".join(parts)


def write_loss_table(metrics: list[dict], path: Path) -> list[tuple[int, float | None, float | None]]:
    """The reference card's table: at each evaluation, the step, the last training loss and the validation loss."""
    rows, last_train = [], None
    for m in metrics:
        if m.get("train_loss") is not None:
            last_train = m["train_loss"]
        if m.get("eval_loss") is not None:
            rows.append((m["step"], last_train, m["eval_loss"]))
    if not rows:  # no evaluation during training: list the training losses alone
        rows = [(m["step"], m["train_loss"], None) for m in metrics if m.get("train_loss") is not None]

    def fmt(x):
        return f"{x:.6f}" if x is not None else "—"

    lines = ["| Step | Training Loss | Validation Loss |", "|---:|---:|---:|"]
    lines += [f"| {s} | {fmt(t)} | {fmt(v)} |" for s, t, v in rows]
    atomic_write(path, "\n".join(lines) + "\n")
    return rows


def plot_losses(metrics: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["train_loss"]) for m in metrics if m.get("train_loss") is not None]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if m.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# The stage


REAL_TOKENS = "num_real_tokens"


def _empty_batch(examples: list[dict], pad_token_id: int):
    """The longest row's length and ``[batch, longest]`` input ids (all pad) and labels (all ignored)."""
    import torch

    from .data import IGNORE_INDEX

    longest = max(len(e["input_ids"]) for e in examples)
    shape = (len(examples), longest)
    return longest, torch.full(shape, pad_token_id, dtype=torch.long), torch.full(shape, IGNORE_INDEX, dtype=torch.long)


class PackedRowsCollator:
    """Packed rows as one ``[batch, longest row]`` tensor whose position ids restart at every example.

    transformers turns restarting position ids into a block-diagonal mask per row, so no example
    attends to another. TRL's padding-free collator instead flattens the whole batch into a single
    row: right for flash-attention's variable-length kernels, but SDPA then computes attention over
    (batch x 512)^2 positions instead of batch x 512^2, 4x more at batch 4 (measured on this CPU:
    attention went from 34% of a training step to 16%). The tail of a shorter row is one more block
    with its own positions; it never carries loss and ``num_real_tokens`` leaves it out of the count.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        from .data import IGNORE_INDEX

        longest, input_ids, labels = _empty_batch(examples, self.pad_token_id)
        position_ids = torch.zeros_like(input_ids)
        real = 0
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            lengths = list(e.get("seq_lengths") or [n])
            if longest > n:
                lengths.append(longest - n)
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            position_ids[i] = torch.cat([torch.arange(k) for k in lengths])
            real += n
        labels[position_ids == 0] = IGNORE_INDEX  # nothing predicts an example's first token from another's
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, REAL_TOKENS: torch.tensor(real)}


class PaddedRowsCollator:
    """One example per row, padded to the longest on ``padding_side``, with an attention mask and no position ids.

    The reference run padded on the left (TRL's collator honoured the tokenizer's padding side) and
    passed no position ids, so a left-padded row's tokens sat at positions shifted by its padding,
    there as here. Rotary attention depends only on the distance between positions, so the shift
    changes each target's loss by rounding only (tests/test_fidelity.py measures it). Pad labels are
    ignored, but with left padding a row's first token is a target predicted from the last pad
    position, as in the reference.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        longest, input_ids, labels = _empty_batch(examples, self.pad_token_id)
        mask = torch.zeros_like(input_ids)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            cols = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            input_ids[i, cols] = torch.tensor(e["input_ids"])
            labels[i, cols] = torch.tensor(e["labels"])
            mask[i, cols] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _collator(recipe: Recipe, tokenizer, attn_implementation: str | None = None):
    """The batches for ``recipe``'s rows; ``attn_implementation``: the one the model trains with (the recipe's)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if not recipe.data.packing:
        return PaddedRowsCollator(tokenizer.pad_token_id, recipe.tokenizer.padding_side)
    if (attn_implementation or recipe.model.attn_implementation) != "flash_attention_2":
        return PackedRowsCollator(tokenizer.pad_token_id)
    # flash-attention's variable-length kernels attend within each example of one flattened row
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)


class EpochsBatchSampler:
    """The batches of ``epochs`` epochs as one pass: each epoch shuffled on its own and ending in its own
    (possibly short) batch, as a per-epoch DataLoader makes them, but with no break between epochs.

    With it the Trainer's accumulation windows run on across epoch boundaries, as transformers 4.40's
    did (it counted micro-batches over the whole run), instead of ending each epoch with a short window.
    """

    def __init__(self, n_rows: int, batch_size: int, epochs: int, seed: int):
        self.n_rows, self.batch_size, self.epochs, self.seed = n_rows, batch_size, epochs, seed

    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.epochs

    def __iter__(self):
        import torch

        for epoch in range(self.epochs):
            order = torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for start in range(0, self.n_rows, self.batch_size):
                yield order[start : start + self.batch_size]


def across_epochs_steps(recipe: Recipe, n_rows: int, processes: int = 1) -> tuple[int, int]:
    """(optimizer steps, epochs of batches) of an ``across_epochs`` run, counted as transformers 4.40 did:
    floor(micro-batches per epoch / accumulation) x epochs (a trailing partial window is never stepped),
    or ``max_steps`` when set, with as many epochs as those steps need."""
    t = recipe.training
    per_process = math.ceil(math.ceil(n_rows / t.batch_size) / processes)
    if t.max_steps > 0:
        return t.max_steps, math.ceil(t.max_steps * t.gradient_accumulation_steps / per_process)
    return max(per_process // t.gradient_accumulation_steps, 1) * int(t.epochs), int(t.epochs)


def across_epochs_saves(recipe: Recipe, n_rows: int, processes: int = 1) -> list[int]:
    """The steps at which transformers 4.40 saved "each epoch" with windows running across epochs: where each
    epoch's last micro-batch falls, floor(k x micro-batches per epoch / accumulation) (552, 1,105 and 1,656 for
    the reference: an epoch's tail micro-batches belong to the next step), and the last step, where training
    stops inside its last epoch."""
    t = recipe.training
    steps, epochs = across_epochs_steps(recipe, n_rows, processes)
    per_process = math.ceil(math.ceil(n_rows / t.batch_size) / processes)
    ends = {k * per_process // t.gradient_accumulation_steps for k in range(1, epochs + 1)}
    return sorted({e for e in ends if 0 < e < steps} | {steps})


def _save_at_steps_callback(steps: list[int]):
    from transformers import TrainerCallback

    class SaveAtSteps(TrainerCallback):
        """A checkpoint at each of ``steps`` and nowhere else (the Trainer's own saving is off)."""

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in steps:
                control.should_save = True

    return SaveAtSteps()


def _datasets(recipe: Recipe, run_dir: Path):
    from trl import pack_dataset

    columns = ["input_ids", "labels"]
    train = load_split(run_dir, "train").select_columns(columns)
    if len(train) == 0:
        raise RecipeError(
            f"the training split is empty: check data.source and the filters in {RunDir(run_dir).stats}"
        )
    if recipe.data.packing:
        # Best-fit-decreasing packing; seq_lengths lets the collator restart position_ids per example,
        # which the model turns into a block-diagonal mask: no example attends to another.
        train = pack_dataset(train, recipe.data.max_length, strategy="bfd")
    evaluation = None
    if recipe.training.eval_steps:
        test = load_split(run_dir, "test")
        if len(test):
            evaluation = test.select_columns(columns)
    return train, evaluation


def _training_arguments(recipe: Recipe, run_dir: Path, cuda: bool, across_epochs_max_steps: int | None = None):
    from transformers import TrainingArguments

    t = recipe.training
    bf16, fp16 = resolve_precision(recipe, cuda)
    epochs, max_steps, save_strategy, save_steps = t.epochs, t.max_steps, t.save_strategy, t.save_steps or 500
    if across_epochs_max_steps:
        # The Trainer sees every epoch's batches as one pass (EpochsBatchSampler), so it is told the
        # steps outright; saving "each epoch" is a callback's, at the steps where 4.40's epochs ended.
        epochs, max_steps = 1.0, across_epochs_max_steps
        if save_strategy == "epoch":
            save_strategy = "no"
    return TrainingArguments(
        output_dir=str(RunDir(run_dir).checkpoints),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        num_train_epochs=epochs,
        max_steps=max_steps,
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_first_step=t.logging_first_step,
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        fp16=fp16,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        report_to=t.report_to or "none",
        use_cpu=not cuda,
        remove_unused_columns=False,  # seq_lengths must reach the collator
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _trainer_class():
    import torch
    from transformers import Trainer

    class CodetuneTrainer(Trainer):
        """The HF Trainer with real-token counts and a non-finite-loss guard (the lean loss is in the model).

        ``loss_normalization`` ("tokens" or "micro_batch", from the recipe) and ``epochs_batch_sampler``
        (an EpochsBatchSampler for across-epoch accumulation windows) are set after construction.
        """

        loss_normalization = "tokens"
        epochs_batch_sampler = None

        def get_train_dataloader(self):
            if self.epochs_batch_sampler is None:
                return super().get_train_dataloader()
            from torch.utils.data import DataLoader

            loader = DataLoader(
                self.train_dataset,
                batch_sampler=self.epochs_batch_sampler,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
            )
            return self.accelerator.prepare(loader)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.loss_normalization == "micro_batch":
                # transformers 4.40: the model's mean over this micro-batch's trained tokens, divided by
                # the accumulation steps (always the full count, as 4.40's accelerate did).
                num_items_in_batch = None
                self.current_gradient_accumulation_steps = self.args.gradient_accumulation_steps
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                ckpts = RunDir(Path(self.args.output_dir).parent).complete_checkpoints()
                raise NonFiniteLossError(self.state.global_step + 1, float(loss), str(ckpts[-1]) if ckpts else None)
            return loss

        def _track_num_input_tokens(self, inputs):
            # Packed rows know their real tokens; padding ids can't tell, <|endoftext|> is both pad and text.
            if REAL_TOKENS not in inputs:
                return super()._track_num_input_tokens(inputs)
            count = inputs[REAL_TOKENS].to(self.args.device).reshape(1)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(count).sum())

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k != REAL_TOKENS}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return CodetuneTrainer


@dataclass
class Checked:
    """What ``check`` found: every check of a training run passed, nothing changed on disk yet."""

    tokenizer: Any
    data_matches: bool  # the run's data/ was prepared from this recipe
    start_over: bool  # an earlier training is there and --overwrite replaces it
    finished: TrainResult | None = None  # --resume of a run with nothing left to do


def check(recipe: Recipe, run_dir: Path, *, resume: bool = False, overwrite: bool = False, say=None) -> Checked:
    """Everything about a training run that can fail cheaply, before anything is written or loaded:
    the hardware, the model source, sharding, integrations, whether the run directory may be written
    and trained again, the tokenizer, the LoRA targets, and what ``--resume`` would continue."""
    rd = RunDir(run_dir)
    for note in check_hardware(recipe, cuda_available()):
        if say is not None:
            say(f"note: {note}")
    check_model_source(recipe.model.name_or_path, "model.name_or_path")
    check_sharded_qlora(recipe)
    check_integrations(recipe)
    start_over = not resume and check_fresh(run_dir, overwrite)
    tokenizer = load_tokenizer(recipe)
    check_chat_template(tokenizer)
    boundary = prompt_boundary(tokenizer)
    if boundary is not None and say is not None:
        say(f"warning: {boundary}")
    stop_token_ids(tokenizer, recipe.generation.stop_tokens)  # evaluation's stop tokens exist, before training
    check_lora_targets_from_config(recipe, resolve_model_path(recipe.model.name_or_path))
    if recipe.lora.init_from is not None:
        check_init_from(recipe)
    matches = data_matches(recipe, run_dir)
    if resume and not matches and rd.complete_checkpoints():
        raise RecipeError(f"cannot resume {run_dir}: its data or model settings differ from this recipe")
    return Checked(tokenizer, matches, start_over, _finished(rd) if resume else None)


def train(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: bool = False,
    console=None,
    callbacks: list | None = None,
    checked: Checked | None = None,
) -> TrainResult:
    """Fine-tune ``recipe``'s model with LoRA on the data prepared in ``run_dir`` (``codetune.pipeline``
    prepares it, clears an earlier training, and passes what it ``check``ed).

    The steps: load the model and attach LoRA, build the trainer, train, save, clean up. ``callbacks``:
    extra ``transformers.TrainerCallback`` objects (timing, custom logging).
    """
    run = _Session(recipe, Path(run_dir), process_state(), cuda_available(), console)
    checked = checked or check(recipe, run_dir, resume=resume, say=run.say)
    if checked.finished is not None:
        run.say(f"{run_dir} finished training at step {checked.finished.global_step}: nothing to resume")
        return checked.finished
    if not data_matches(recipe, run_dir):
        raise RecipeError(
            f"{run_dir} has no data prepared from this recipe: run `codetune prepare` first "
            "(`codetune train` and `codetune run` prepare it themselves)"
        )
    train_ds, eval_ds = _datasets(recipe, run_dir)
    resume_from = _resume_point(run, resume)
    model, trainable, total = _load_model(run)
    trainer = _build_trainer(run, model, checked.tokenizer, train_ds, eval_ds, callbacks)

    # ---- train
    t0 = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - t0

    # ---- save
    metrics = _read_metrics(run.rd.metrics)
    summary = _train_summary(run, trainer, output, metrics, wall, trainable, total, resume_from)
    if trainer.is_world_process_zero():
        _save(run, trainer, checked.tokenizer, metrics, summary)
    run.state.wait_for_everyone()
    if console is not None:
        console.print(
            f"rank {run.state.process_index}/{run.state.num_processes} finished at step {trainer.state.global_step}",
            highlight=False,
        )

    # ---- cleanup
    del trainer, model
    gc.collect()
    return TrainResult(
        run.run_dir, run.rd.adapter, summary["global_step"], summary["last_train_loss"], summary["last_eval_loss"],
        summary,
    )  # fmt: skip


@dataclass
class _Session:
    """What every step of ``train`` reads: the recipe, the run directory, the processes, the device."""

    recipe: Recipe
    run_dir: Path
    state: Any  # accelerate's PartialState
    cuda: bool
    console: Any
    rd: RunDir = field(init=False)
    attn: str = field(init=False)  # the attention implementation the model trains with
    attn_note: str | None = field(init=False)

    def __post_init__(self) -> None:
        self.rd = RunDir(self.run_dir)
        self.attn, self.attn_note = training_attention(self.recipe, self.cuda)

    def say(self, msg: str) -> None:
        if self.console is not None and self.state.is_main_process:
            self.console.print(msg, highlight=False)


def _resume_point(run: _Session, resume: bool) -> str | None:
    if not resume:
        return None
    ckpts = run.rd.complete_checkpoints()
    if not ckpts:
        run.say("no complete checkpoint to resume from: starting from the beginning")
        return None
    run.say(f"resuming from {ckpts[-1]}")
    return str(ckpts[-1])


def _load_model(run: _Session):
    """The base model with the lean loss (where it applies) and LoRA attached; its trainable and total parameters."""
    recipe = run.recipe
    device_map = {"": run.state.local_process_index} if run.cuda else None
    if run.attn_note:
        run.say(f"note: {run.attn_note}")
    model = load_base_model(recipe, device_map=device_map, attn_implementation=run.attn)
    # FSDP and ZeRO-3 hold the head's weight sharded outside its own forward: keep the model's loss there
    lean = not sharded_mode() and add_lean_loss(model)
    bf16 = resolve_precision(recipe, run.cuda)[0]
    if recipe.lora.dtype == "bfloat16" and not lora_in_bf16(model, recipe, bf16):
        run.say("note: lora.dtype bfloat16 applies to bf16 training on a 4-bit base only: LoRA weights stay float32")
    model = attach_lora(model, recipe, gradient_checkpointing=recipe.training.gradient_checkpointing, bf16=bf16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    run.say(f"model {recipe.model.name_or_path}: {trainable:,} trainable LoRA parameters of {total:,}")
    if not lean:
        why = "FSDP / ZeRO-3 shard the head" if sharded_mode() else "this model's head is not a plain projection"
        run.say(f"note: {why}: training uses the model's own loss (full logits)")
    return model, trainable, total


def _build_trainer(run: _Session, model, tokenizer, train_ds, eval_ds, callbacks: list | None):
    from transformers.trainer_callback import PrinterCallback

    recipe, state = run.recipe, run.state
    sampler, steps, extra = None, None, []
    if recipe.training.accumulation_windows == "across_epochs":
        t = recipe.training
        steps, epochs = across_epochs_steps(recipe, len(train_ds), state.num_processes)
        sampler = EpochsBatchSampler(len(train_ds), t.batch_size, epochs, t.seed)
        run.say(f"accumulation windows run across epochs: {steps} optimizer steps ({epochs} epochs of batches)")
        if t.save_strategy == "epoch":
            saves = across_epochs_saves(recipe, len(train_ds), state.num_processes)
            extra.append(_save_at_steps_callback(saves))
            run.say(f"a checkpoint where each epoch ends: steps {', '.join(map(str, saves))}")
    console = run.console if state.is_main_process else None
    trainer = _trainer_class()(
        model=model,
        args=_training_arguments(recipe, run.run_dir, run.cuda, steps),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=_collator(recipe, tokenizer, run.attn),
        processing_class=tokenizer,
        callbacks=[
            _metrics_callback(run.run_dir, console, sampler.epochs if sampler else 1.0),
            *extra,
            *(callbacks or []),
        ],
    )
    trainer.loss_normalization = recipe.training.loss_normalization
    trainer.epochs_batch_sampler = sampler
    trainer.remove_callback(PrinterCallback)  # our callback reports; the Trainer's would print raw dicts
    return trainer


def _train_summary(
    run: _Session, trainer, output, metrics: list[dict], wall: float, trainable: int, total: int, resume_from
) -> dict[str, Any]:
    last_eval = next((m["eval_loss"] for m in reversed(metrics) if m.get("eval_loss") is not None), None)
    last_train = next((m["train_loss"] for m in reversed(metrics) if m.get("train_loss") is not None), None)
    return {
        "recipe": run.recipe.name,
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss_mean": output.training_loss,
        "last_train_loss": last_train,
        "last_eval_loss": last_eval,
        "tokens": trainer.state.num_input_tokens_seen,
        "wall_s_this_session": round(wall, 2),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "resumed_from": resume_from,
        "world_size": run.state.num_processes,
        "device": "cuda" if run.cuda else "cpu",
    }


def _earlier_adapter(p: Path) -> bool:
    """This run's adapter (a resumed run that had finished once)."""
    return p.is_dir() and not p.is_symlink() and (p / ADAPTER_CONFIG).is_file()


def _save(run: _Session, trainer, tokenizer, metrics: list[dict], summary: dict) -> None:
    """The adapter (with the tokenizer), the loss table and plot, and train_summary.json."""
    rd = run.rd
    with staged_dir(rd.adapter, "adapter", overwrite=True, ours=_earlier_adapter, what="adapter") as staging:
        trainer.save_model(str(staging))
        tokenizer.save_pretrained(str(staging))
    write_loss_table(metrics, rd.loss_table)
    if metrics:
        plot_losses(metrics, rd.loss_plot, f"{run.recipe.name}: loss")
    atomic_write(rd.train_summary, json.dumps(summary, indent=2) + "\n")
