"""The tiny models codetune builds itself, one per model family that declares a ``TinySpec``.

``builtin:tiny-phi3`` is a Phi-3-architecture model of a few hundred thousand parameters with
a byte-level BPE tokenizer trained on the spot on the starter set. It is built once into the
codetune cache (``$CODETUNE_HOME``, default ``~/.cache/codetune``) and lets the whole pipeline
run offline on a laptop CPU in minutes. ``builtin:tiny-qwen2`` and ``builtin:tiny-llama`` are the same
for their families.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import RecipeError
from .families import Family, builtin_models
from .families import phi3 as _phi3

TINY_MODEL = "builtin:tiny-phi3"
# The Phi-3 special tokens, in Phi-3's order; the tiny tokenizer gives them the first ids.
PHI3_SPECIAL_TOKENS = list(_phi3.SPECIAL_TOKENS)


def codetune_home() -> Path:
    return Path(os.environ.get("CODETUNE_HOME") or Path.home() / ".cache" / "codetune")


# Pure-Python standard-library modules: the tiny base's pre-training text. Never the starter set,
# whose held-out tasks are the tiny model's test: a base that had read their answers would be contaminated.
_PRETRAIN_MODULES = [
    "textwrap",
    "heapq",
    "bisect",
    "fractions",
    "statistics",
    "string",
    "shlex",
    "difflib",
    "fnmatch",
    "colorsys",
    "calendar",
    "functools",
    "collections/__init__",
    "json/encoder",
    "json/decoder",
    "csv",
    "random",
    "queue",
    "graphlib",
    "operator",
    "copy",
    "pprint",
    "reprlib",
    "numbers",
    "dataclasses",
    "enum",
    "ipaddress",
    "base64",
    "quopri",
    "keyword",
    "token",
    "tokenize",
    "weakref",
    "abc",
    "glob",
]


def _pretrain_corpus() -> list[str]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in _PRETRAIN_MODULES:
        path = stdlib / f"{name}.py"
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8"))
    return texts


def _starter_corpus() -> list[str]:
    from .starter import load_starter

    texts = []
    for row in load_starter():
        texts.extend([row["instruction"], row["input"], row["output"], *row["test_list"]])
    return [t for t in texts if t]


def build_tiny_tokenizer(vocab_size: int = 2048, family: Family | None = None):
    """A byte-level BPE tokenizer with the family's special tokens and chat template (default Phi-3's),
    trained on Python source."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tokenizers import Regex

    spec = (family or _phi3.FAMILY).tiny
    if spec.split_regex is None:  # GPT-2's split
        tok = Tokenizer(models.BPE(unk_token=spec.unk_token))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # the family's own split, as its hub tokenizer.json has it (Llama 3: whole words in the vocabulary unmerged)
        tok = Tokenizer(models.BPE(unk_token=spec.unk_token, ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(spec.split_regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_pretrain_corpus() + _starter_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos_token,
        eos_token=spec.eos_token,
        unk_token=spec.unk_token,
        pad_token=spec.pad_token,
        chat_template=spec.chat_template,
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def pretrain_tiny(
    model,
    tokenizer,
    *,
    steps: int,
    block: int = 128,
    batch: int = 16,
    lr: float = 3e-3,
    on_step=None,
) -> None:
    """A short full-parameter pre-training on Python standard-library source (no chat format).

    A frozen random base is a poor stand-in for a pretrained one: LoRA on top of it barely moves
    the loss. After this the tiny base knows the tokens and shapes of Python, and fine-tuning has
    what a real fine-tune has to do: learn to answer an instruction in the chat format, and stop.
    """
    import torch

    if steps <= 0:
        return
    ids: list[int] = []
    for text in _pretrain_corpus():
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    data = torch.tensor(ids[: (len(ids) // block) * block]).view(-1, block)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    model.train()
    for step in range(steps):
        rows = data[torch.randint(len(data), (batch,), generator=gen)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, loss.item())
    model.eval()


class BuildProgress:
    """Progress of the tiny model's build on stderr: a live bar on a terminal, a plain line every
    tenth of the pre-training (and at each stage) when stderr is a log or a pipe."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.t0 = time.perf_counter()
        self.progress = None

    def say(self, message: str) -> None:
        # soft_wrap: a log or a pipe gets whole lines (a long cache path is never broken at 80 columns)
        self.console.print(
            f"tiny model: {message} ({time.perf_counter() - self.t0:.0f}s)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )

    def start_pretraining(self, steps: int) -> None:
        self.steps, self.t_pre = steps, time.perf_counter()
        # a line every tenth, not from the first step: it includes warm-up, and an ETA from it would be wild
        self.every = max(1, steps // 10)
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]tiny model: pre-training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task("pretrain", total=steps, info="")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def step(self, done: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, info=f"loss {loss:.3f}")
            if done == self.steps:
                self.close()
            return
        if done % self.every == 0 or done == self.steps:
            dt = time.perf_counter() - self.t_pre
            eta = dt / done * (self.steps - done)
            self.console.print(
                f"tiny model: pre-training step {done}/{self.steps} | loss {loss:.3f} | eta {eta:.0f}s",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )


def build_tiny_model(
    out_dir: Path,
    family: Family | None = None,
    *,
    seed: int = 0,
    pretrain_steps: int | None = None,
    progress: BuildProgress | None = None,
) -> Path:
    """Build the family's tiny model (default Phi-3; random weights, fixed seed, briefly pre-trained) and its
    tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    family = family or _phi3.FAMILY
    spec = family.tiny
    if progress is not None:
        progress.say("training its tokenizer")
    tokenizer = build_tiny_tokenizer(family=family)
    config = spec.config(tokenizer)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    steps = spec.pretrain_steps if pretrain_steps is None else pretrain_steps
    if progress is not None:
        progress.say(f"{sum(p.numel() for p in model.parameters()):,} parameters, pre-training on stdlib source")
        progress.start_pretraining(steps)
    pretrain_tiny(model, tokenizer, steps=steps, on_step=progress.step if progress is not None else None)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(spec.stop_tokens))],
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_tiny_model(name: str = TINY_MODEL) -> Path:
    """The cached tiny model's folder, building it on first use (atomically: a crash leaves no half model)."""
    family = builtin_models()[name]
    stem = f"tiny-{family.name}"
    target = codetune_home() / "models" / f"{stem}-{family.tiny.version}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    # Two commands (or two test workers) that need it at once: one builds, the other waits and reuses it
    with FileLock(str(target.parent / f".{stem}-{family.tiny.version}.lock")):
        if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
            return target
        return _build_into(target, name, family, stem)


def _build_into(target: Path, name: str, family: Family, stem: str) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}-", dir=target.parent))
    progress = BuildProgress()
    progress.say(f"building {name} once into {target}")
    try:
        build_tiny_model(staging, family, progress=progress)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        progress.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress.say("built")
    return target


def resolve_model_path(name_or_path: str) -> str:
    """builtin:* -> a local folder; an existing local path stays; anything else is a hub id."""
    builtins = builtin_models()
    if name_or_path in builtins:
        return str(ensure_tiny_model(name_or_path))
    if name_or_path.startswith("builtin:"):
        raise RecipeError(
            f"model.name_or_path: unknown builtin model {name_or_path!r}; available: {', '.join(builtins)}"
        )
    return name_or_path
