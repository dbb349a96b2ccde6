"""Models and tokenizers: the hub/local loaders, and the tiny Phi-3 that codetune builds itself.

``builtin:tiny-phi3`` is a Phi-3-architecture model of a few hundred thousand parameters with
a byte-level BPE tokenizer trained on the spot on the starter set. It is built once into the
codetune cache (``$CODETUNE_HOME``, default ``~/.cache/codetune``) and lets the whole pipeline
run offline on a laptop CPU in minutes. Everything else is a hub id or a local folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from .recipe import LoraConfig as LoraSection
from .recipe import Recipe, RecipeError
from .families import Family, builtin_models
from .families import phi3 as _phi3
from .templates import resolve_template

TINY_MODEL = "builtin:tiny-phi3"
# The Phi-3 special tokens, in Phi-3's order; the tiny tokenizer gives them the first ids.
PHI3_SPECIAL_TOKENS = list(_phi3.SPECIAL_TOKENS)
# The Phi-3-mini-4k-instruct architecture, kept under its old name.
phi3_mini_config = _phi3.full_config


def codetune_home() -> Path:
    return Path(os.environ.get("CODETUNE_HOME") or Path.home() / ".cache" / "codetune")


# ---------------------------------------------------------------------------------------
# The tiny model


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

    spec = (family or _phi3.FAMILY).tiny
    tok = Tokenizer(models.BPE(unk_token=spec.unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def check_model_source(name_or_path: str, field: str) -> None:
    """Fail early, naming the field, when a local-looking path does not exist."""
    if name_or_path.startswith("builtin:"):
        return
    if _looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise RecipeError(f"{field}: local path {name_or_path!r} does not exist")


# ---------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(recipe: Recipe):
    """The recipe's tokenizer with its chat template, pad token, padding side and length applied."""
    from transformers import AutoTokenizer

    field = "tokenizer.name_or_path" if recipe.tokenizer.name_or_path else "model.name_or_path"
    check_model_source(recipe.tokenizer_path, field)
    path = resolve_model_path(recipe.tokenizer_path)
    cfg = recipe.tokenizer
    try:
        if cfg.encode_with == "tokenizer_json":
            tokenizer = _tokenizer_json_as_written(path, recipe.tokenizer_revision, field)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                path, revision=recipe.tokenizer_revision, trust_remote_code=recipe.model.trust_remote_code
            )
    except OSError as exc:
        raise RecipeError(f"{field}: cannot load a tokenizer from {path!r}: {exc}") from None
    template = resolve_template(cfg.chat_template)
    if template is not None:
        tokenizer.chat_template = template
    if not tokenizer.chat_template:
        raise RecipeError(f"tokenizer.chat_template: the tokenizer at {path!r} has no chat template; name one")
    if cfg.pad_token is not None:
        if cfg.pad_token not in tokenizer.get_vocab():
            raise RecipeError(f"tokenizer.pad_token: {cfg.pad_token!r} is not in the tokenizer's vocabulary")
        tokenizer.pad_token = cfg.pad_token
    if tokenizer.pad_token is None:
        raise RecipeError("tokenizer.pad_token: the tokenizer has no pad token; set one (e.g. <|endoftext|>)")
    tokenizer.padding_side = cfg.padding_side
    if cfg.model_max_length:
        tokenizer.model_max_length = cfg.model_max_length
    return tokenizer


def _tokenizer_json_as_written(path: str, revision: str | None, field: str):
    """tokenizer.json run by the `tokenizers` library as written, the way transformers 4.40 ran it.

    The generic fast class keeps the file's normalizer, pre-tokenizer and decoder; the model's own
    class in transformers 5.24 (LlamaTokenizer for Phi-3) rebuilds them, and its ids differ.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, revision=revision)
    if getattr(tokenizer, "_tokenizer", None) is None:
        raise RecipeError(f"tokenizer.encode_with tokenizer_json: {field} {path!r} has no tokenizer.json")
    return tokenizer


def stop_token_ids(tokenizer, stop_tokens: list[str]) -> list[int]:
    """The ids of ``stop_tokens``; none named: the tokenizer's eos (a model family codetune does not know)."""
    if not stop_tokens:
        if tokenizer.eos_token_id is None:
            raise RecipeError("generation.stop_tokens: none given and the tokenizer has no eos token; name one")
        return [tokenizer.eos_token_id]
    ids = []
    for token in stop_tokens:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id:
            raise RecipeError(f"generation.stop_tokens: {token!r} is not a single token of this tokenizer")
        ids.append(tid)
    return ids


# ---------------------------------------------------------------------------------------
# LoRA


def peft_lora_config(lora: LoraSection):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        task_type=TaskType.CAUSAL_LM,
    )


def linear_module_names(model) -> list[str]:
    """Distinct leaf names of the model's linear layers (what LoRA can target)."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_lora_targets(model, lora: LoraSection) -> None:
    if lora.target_modules == "all-linear":
        return
    available = linear_module_names(model)
    missing = [m for m in lora.target_modules if m not in available]
    # PEFT matches a target against any suffix of a module name, so a name can still match
    # nothing; the reference recipe names q/k/v_proj on a model that fuses them, which is a
    # known and reproduced fault, so only a recipe matching nothing at all is an error.
    if len(missing) == len(lora.target_modules):
        raise RecipeError(f"lora.target_modules: none of {missing} is a linear layer of this model; it has {available}")


def count_trainable_lora_params(config, lora: LoraSection) -> tuple[int, int]:
    """(trainable, total) parameters of ``config``'s model with LoRA attached, built on the meta device."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_lora_targets(model, lora)
    model = get_peft_model(model, peft_lora_config(lora))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------
# Loading the base model (quantized or not) and attaching LoRA


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}[name]


def disable_avx512_bf16_path(model) -> int:
    """Switch off bitsandbytes' AVX512-BF16 CPU path on every 4-bit layer; returns how many were switched.

    bitsandbytes 0.50 repacks a Linear4bit's weight for that path on the first eval-mode forward
    on such a CPU; afterwards LoRA gradients and merges come out wrong, silently. The plain path
    is correct on every CPU, so codetune always takes it.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def sharded_mode() -> str | None:
    """'fsdp' or 'deepspeed' when ``accelerate launch`` runs with one of them, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return None


def check_sharded_qlora(recipe: Recipe) -> None:
    """FSDP and ZeRO-3 shard only floating-point tensors: 4-bit weights must be stored in the compute dtype."""
    mode = sharded_mode()
    q = recipe.quantization
    if mode and q.load_in_4bit and q.quant_storage != q.compute_dtype:
        raise RecipeError(
            f"quantization.quant_storage is {q.quant_storage}, but {mode} shards the 4-bit weights and needs "
            f"them stored in the compute dtype: --set quantization.quant_storage={q.compute_dtype}"
        )


def quantization_config(recipe: Recipe):
    from transformers import BitsAndBytesConfig

    q = recipe.quantization
    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(q.quant_storage),
    )


def check_lora_targets_from_config(recipe: Recipe, model_path: str) -> None:
    """Check LoRA targets against the architecture built on the meta device: no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(
            model_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    except OSError as exc:
        raise RecipeError(f"model.name_or_path: cannot read the configuration of {model_path!r}: {exc}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    check_lora_targets(skeleton, recipe.lora)


def load_base_model(recipe: Recipe, *, device_map=None, quantize: bool | None = None, dtype: str | None = None):
    """The base model as the recipe asks: 4-bit NF4 through bitsandbytes, or unquantized in the compute dtype
    (or ``dtype``)."""
    from transformers import AutoModelForCausalLM

    check_model_source(recipe.model.name_or_path, "model.name_or_path")
    path = resolve_model_path(recipe.model.name_or_path)
    quantize = recipe.quantization.load_in_4bit if quantize is None else quantize
    dtype = dtype or recipe.quantization.compute_dtype
    if sharded_mode():
        check_sharded_qlora(recipe)
        device_map = None  # FSDP / ZeRO-3 place the shards themselves
        dtype = recipe.quantization.quant_storage if quantize else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
            attn_implementation=recipe.model.attn_implementation,
            dtype=torch_dtype(dtype),
            quantization_config=quantization_config(recipe) if quantize else None,
            device_map=device_map,
        )
    except OSError as exc:
        raise RecipeError(f"model.name_or_path: cannot load {path!r}: {exc}") from None
    disable_avx512_bf16_path(model)
    return model


def attach_lora(model, recipe: Recipe, *, gradient_checkpointing: bool):
    """Freeze the base, make it trainable in k-bit where quantized, attach fresh LoRA weights."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_lora_targets(model, recipe.lora)
    # With a KV cache the model skips packed-sequence detection, and packed examples would attend
    # to each other; training never needs the cache. generate() turns it back on for itself.
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}  # reentrant checkpointing breaks with frozen inputs and DDP
    if getattr(model, "is_loaded_in_4bit", False) and not sharded_mode():
        # (Sharded QLoRA skips this: its fp32 upcast would break FSDP's uniform-dtype shards.)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    torch.manual_seed(recipe.training.seed)  # LoRA's A matrices are random: same seed, same start
    return get_peft_model(model, peft_lora_config(recipe.lora))
