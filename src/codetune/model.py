"""Models and tokenizers: the hub and local loaders (4-bit or not), LoRA, and the merged model.

A builtin name (``builtin:tiny-phi3``) resolves to the tiny model codetune builds itself (codetune.tiny);
everything else is a hub id or a local folder.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .families import family_for_source, looks_local
from .families import phi3 as _phi3
from .recipe import LoraConfig as LoraSection
from .recipe import Recipe, RecipeError
from .rundir import ADAPTER_CONFIG
from .templates import REFERENCE_TOKENIZERS, ReferenceTokenizer, resolve_template, with_template_defaults
from .tiny import resolve_model_path

# The Phi-3-mini-4k-instruct architecture, kept under its old name.
phi3_mini_config = _phi3.full_config


def check_model_source(name_or_path: str, field: str) -> None:
    """Fail early, naming the field, when a local-looking path does not exist."""
    if name_or_path.startswith("builtin:"):
        return
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
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
    except (OSError, ValueError) as exc:  # transformers says "install sentencepiece" for files it never found
        raise RecipeError(_tokenizer_error(field, path, recipe.tokenizer_revision, exc)) from None
    own_template = tokenizer.chat_template
    template = resolve_template(cfg.chat_template)
    if template is not None:
        tokenizer.chat_template = template
    if not tokenizer.chat_template:
        raise RecipeError(f"tokenizer.chat_template: the tokenizer at {path!r} has no chat template; name one")
    defaults = family_for_source(recipe.model.name_or_path, revision=recipe.model.revision).template_defaults
    if defaults:
        tokenizer.chat_template = with_template_defaults(tokenizer.chat_template, defaults)
    if cfg.pad_token is not None:
        if cfg.pad_token not in tokenizer.get_vocab():
            raise RecipeError(f"tokenizer.pad_token: {cfg.pad_token!r} is not in the tokenizer's vocabulary")
        tokenizer.pad_token = cfg.pad_token
    if tokenizer.pad_token is None:
        raise RecipeError("tokenizer.pad_token: the tokenizer has no pad token; set one (e.g. <|endoftext|>)")
    tokenizer.padding_side = cfg.padding_side
    if cfg.model_max_length:
        tokenizer.model_max_length = cfg.model_max_length
    if cfg.reference is not None:
        check_reference_tokenizer(tokenizer, own_template, recipe, path)
    return tokenizer


def _tokenizer_error(field: str, path: str, revision: str | None, exc: Exception) -> str:
    """One line: a hub tokenizer that is not cached while the hub is unreachable says so, and how to point the
    recipe at local files; any other failure keeps the library's reason, on one line."""
    if not looks_local(path) and not _cached(path, revision) and _hub_unreachable(exc):
        at = f" at revision {revision}" if revision else ""
        return (
            f"{field}: the tokenizer of {path!r}{at} is not on this machine and needs the Hugging Face hub, which "
            "is off or unreachable here (HF_HUB_OFFLINE=1: the Makefile sets it): run once with the hub reachable "
            "(HF_HUB_OFFLINE unset) to cache it, or point the recipe at local tokenizer files with "
            "--set tokenizer.name_or_path=DIR (a folder holding tokenizer.json and tokenizer_config.json)"
        )
    return f"{field}: cannot load a tokenizer from {path!r}: {' '.join(str(exc).split())}"


def _cached(repo_id: str, revision: str | None) -> bool:
    """The hub client's cache holds the tokenizer of ``repo_id`` (at ``revision``)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "tokenizer_config.json", revision=revision), str)
    except ValueError:  # not a valid repo id
        return False


def _hub_unreachable(exc: BaseException) -> bool:
    """Offline mode is on, or the failure came from not reaching the hub."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    seen: BaseException | None = exc
    while seen is not None:
        name = type(seen).__name__
        if "Connect" in name or "Offline" in name or "Timeout" in name or "couldn't connect" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class ReferenceTokenizerWarning(UserWarning):
    """The tokenizer is not the one ``tokenizer.reference`` names, and ``tokenizer.reference_mismatch`` is warn."""


def _first_difference(ours: list, theirs: list) -> int:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))


def _ids_difference(tokenizer, what: str, ours: list[int], theirs: list[int]) -> str | None:
    """How ``ours`` differs from the reference's ``theirs`` at the first differing position, or None."""
    if ours == theirs:
        return None
    i = _first_difference(ours, theirs)

    def at(ids: list[int]) -> str:
        return f"{ids[i]} ({tokenizer.convert_ids_to_tokens(ids[i])!r})" if i < len(ids) else "nothing"

    return (
        f"{what}: the ids differ from position {i} on: {at(ours)} where the reference has {at(theirs)} "
        f"({len(ours)} ids, the reference {len(theirs)})"
    )


def reference_differences(tokenizer, own_template: str | None, recipe: Recipe, ref: ReferenceTokenizer) -> list[str]:
    """What differs between ``tokenizer`` (loaded and set up for ``recipe``) and the reference tokenizer ``ref``:
    the chat template of its files, the known conversation as the recipe renders it, and its ids as a
    training row and as an evaluation prompt. Empty when the tokenizer is the reference's."""
    found = []
    if own_template != ref.chat_template:
        i = _first_difference(list(own_template or ""), list(ref.chat_template))
        found.append(
            f"its own chat template is not the reference's: from character {i} it reads "
            f"{(own_template or '')[i : i + 40]!r} where the reference's reads {ref.chat_template[i : i + 40]!r}"
        )
    text = tokenizer.apply_chat_template(ref.messages, tokenize=False)
    if text != ref.text:
        i = _first_difference(list(text), list(ref.text))
        found.append(
            f"the recipe renders the known conversation differently from character {i}: {text[i : i + 40]!r} "
            f"where the reference has {ref.text[i : i + 40]!r}"
        )
    cfg = recipe.tokenizer
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [tokenizer.bos_token_id] * cfg.add_bos_token + body + [tokenizer.eos_token_id] * cfg.add_eos_token
    prompt = tokenizer.apply_chat_template(ref.messages[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # as the text-generation pipeline
    found.append(_ids_difference(tokenizer, "a known training row", ids, ref.ids))
    found.append(_ids_difference(tokenizer, "its evaluation prompt", prompt_ids, ref.prompt_ids))
    return [f for f in found if f]


def check_reference_tokenizer(tokenizer, own_template: str | None, recipe: Recipe, path: str) -> None:
    """Refuse (or, with ``tokenizer.reference_mismatch: warn``, warn about) a tokenizer that is not the one
    ``tokenizer.reference`` names, saying what differs."""
    ref = REFERENCE_TOKENIZERS[recipe.tokenizer.reference]
    found = reference_differences(tokenizer, own_template, recipe, ref)
    if not found:
        return
    message = (
        f"tokenizer.reference {ref.name}: the tokenizer at {path!r} is not the reference's ({ref.source}):\n  "
        + "\n  ".join(found)
    )
    if recipe.tokenizer.reference_mismatch == "warn":
        warnings.warn(
            message + "\n(tokenizer.reference_mismatch is warn: going on with it)",
            ReferenceTokenizerWarning,
            stacklevel=3,
        )
        return
    raise RecipeError(
        message + "\nGive the reference's tokenizer files (tokenizer.name_or_path), or set "
        "tokenizer.reference_mismatch: warn to go on with this one."
    )


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


SAMPLE_CONVERSATION = [
    {"role": "user", "content": "Write a Python function add(a, b) that returns a + b."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
]


def check_chat_template(tokenizer) -> None:
    """The chat template renders a user turn and an answer, and a prompt ready for one: checked before any
    data is prepared, so a template that cannot is one error naming the field, not a traceback mid-run."""
    try:
        text = tokenizer.apply_chat_template(SAMPLE_CONVERSATION, tokenize=False)
        prompt = tokenizer.apply_chat_template(SAMPLE_CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja's TemplateError, a raise_exception() in the template, a bad filter
        raise RecipeError(
            f"tokenizer.chat_template cannot render a user turn and an answer: {' '.join(str(exc).split())[:300]}"
        ) from None
    if not isinstance(text, str) or "return a + b" not in text or "add(a, b)" not in prompt:
        raise RecipeError("tokenizer.chat_template: a sample conversation renders without its messages' text")


def prompt_boundary(tokenizer) -> str | None:
    """Whether the generation prompt's tokens begin the trained conversation's tokens. When they do not, the
    prompt ends on a token the trained answers never had there (the tiny Llama with GPT-2's split: its prompt
    ended on one "\\n\\n" token, its training rows on two "\\n"), and a fine-tune may answer nothing at all.
    None when they do; else what differs, for a warning."""
    text = tokenizer.apply_chat_template(SAMPLE_CONVERSATION, tokenize=False)
    prompt = tokenizer.apply_chat_template(SAMPLE_CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not text.startswith(prompt) or whole[: len(head)] == head:
        return None
    at = next((i for i, (a, b) in enumerate(zip(head, whole, strict=False)) if a != b), min(len(head), len(whole)))
    shown = tokenizer.convert_ids_to_tokens
    return (
        f"the chat template's generation prompt ends on tokens {shown(head[at:])} where a trained conversation has "
        f"{shown(whole[at : len(head) + 1])}: generation starts from a token boundary training never showed"
    )


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
    """Every module ``lora.target_modules`` names must be a linear layer of ``model``: PEFT would silently
    train only the ones that match (a Phi-3 list on a Qwen2 model trains o_proj and down_proj alone).
    ``lora.unmatched_targets: allow`` (the reference notebook's list, reproduced on purpose) refuses only
    a list that matches nothing."""
    if lora.target_modules in ("all-linear", "family"):
        return
    available = linear_module_names(model)
    missing = [m for m in lora.target_modules if m not in available]
    if not missing or (lora.unmatched_targets == "allow" and len(missing) < len(lora.target_modules)):
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None) or "this model"
    raise RecipeError(
        f"lora.target_modules: {', '.join(missing)} match{'es' if len(missing) == 1 else ''} no linear layer of "
        f"{model_type}, which has {', '.join(available)}; use `family` (the model family's attention and mlp "
        "modules), all-linear, or names from that list"
    )


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


def load_base_model(
    recipe: Recipe,
    *,
    device_map=None,
    quantize: bool | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
):
    """The base model as the recipe asks: 4-bit NF4 through bitsandbytes, or unquantized in the compute dtype
    (or ``dtype``), with ``model.attn_implementation`` (or ``attn_implementation``)."""
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
            attn_implementation=attn_implementation or recipe.model.attn_implementation,
            dtype=torch_dtype(dtype),
            quantization_config=quantization_config(recipe) if quantize else None,
            device_map=device_map,
        )
    except OSError as exc:
        raise RecipeError(f"model.name_or_path: cannot load {path!r}: {exc}") from None
    disable_avx512_bf16_path(model)
    return model


def flash_attention_2_unavailable(cuda: bool) -> str | None:
    """Why flash-attention 2 cannot run here (no CUDA GPU, a GPU without bf16, no flash_attn package), or None."""
    if not cuda:
        return "no CUDA GPU"
    import torch
    from transformers.utils import is_flash_attn_2_available

    if not torch.cuda.is_bf16_supported():
        return "the GPU has no bf16 (flash-attention 2 needs an Ampere or newer GPU)"
    if not is_flash_attn_2_available():
        return "the flash_attn package is not installed"
    return None


def cast_lora_like_trl_0_8_6(model) -> None:
    """The dtypes TRL 0.8.6's SFTTrainer gave a PEFT model trained in bf16 on a 4-bit base
    (``peft_module_casting_to_bf16``, run after ``get_peft_model``): every LoRA layer in bf16, every module
    whose name holds "norm" (or a LayerNorm) in fp32, and the embeddings and lm_head in bf16 where they are
    fp32. The 4-bit weights are integers and keep their storage."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():  # a parent comes before its children, as in TRL
        if isinstance(module, BaseTunerLayer):
            module.to(torch.bfloat16)
        elif isinstance(module, torch.nn.LayerNorm) or "norm" in name:
            module.to(torch.float32)
        elif any(part in name for part in ("lm_head", "embed_tokens", "wte", "wpe")):
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dtype == torch.float32:
                module.to(torch.bfloat16)


def attach_lora(model, recipe: Recipe, *, gradient_checkpointing: bool, bf16: bool = False):
    """Freeze the base, make it trainable in k-bit where quantized, attach fresh LoRA weights.

    ``bf16``: training runs in bf16; with ``lora.dtype: bfloat16`` and a 4-bit base the weights then get
    TRL 0.8.6's dtypes (:func:`cast_lora_like_trl_0_8_6`); otherwise they stay as PEFT makes them (fp32)."""
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
    model = get_peft_model(model, peft_lora_config(recipe.lora))
    if recipe.lora.init_from is not None:
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        path = check_init_from(recipe, model)
        missing = set_peft_model_state_dict(model, load_peft_weights(str(path), device="cpu")).unexpected_keys
        if missing:
            raise RecipeError(f"lora.init_from: {path} has weights for modules this model's LoRA lacks: {missing[:3]}")
    if lora_in_bf16(model, recipe, bf16):
        cast_lora_like_trl_0_8_6(model)
    return model


def check_init_from(recipe: Recipe, model=None) -> Path:
    """``lora.init_from``'s folder, when it is an adapter of the recipe's rank and (given ``model``, a PEFT model)
    targets the modules the recipe's LoRA has; RecipeError naming the field otherwise."""
    from .errors import CodetuneError
    from .rundir import ADAPTER_CONFIG
    from .runfiles import read_adapter_config

    path = Path(recipe.lora.init_from or "").expanduser()
    try:
        config = read_adapter_config(path / ADAPTER_CONFIG)
    except CodetuneError as exc:
        raise RecipeError(f"lora.init_from: {path} is not a readable LoRA adapter folder ({exc})") from None
    if config is None:
        raise RecipeError(f"lora.init_from: {path} is not a readable LoRA adapter folder (no {ADAPTER_CONFIG})")
    if config.get("r") != recipe.lora.r:
        raise RecipeError(f"lora.init_from: {path} has LoRA rank {config.get('r')}, the recipe's lora.r is {recipe.lora.r}")
    if model is not None:
        theirs, ours = set(config.get("target_modules") or ()), set(model.peft_config["default"].target_modules)
        if theirs != ours:
            raise RecipeError(
                f"lora.init_from: {path} targets {sorted(theirs)}, the recipe's LoRA targets {sorted(ours)}"
            )
    return path


def lora_in_bf16(model, recipe: Recipe, bf16: bool) -> bool:
    """Whether ``lora.dtype: bfloat16`` applies: TRL 0.8.6's condition (bf16 training, a 4-bit base, not sharded)."""
    quantized = getattr(model, "is_loaded_in_4bit", False)
    return recipe.lora.dtype == "bfloat16" and bf16 and quantized and not sharded_mode()


def load_adapter(base, adapter_dir: Path, recipe: Recipe):
    """``base`` with the run's adapter on top. An adapter whose files are sound (``RunDir.check_adapter``)
    but do not fit this base (modules it lacks, other shapes) is one error naming the adapter."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:500]
        raise RecipeError(
            f"{adapter_dir} does not fit {recipe.model.name_or_path} (its {ADAPTER_CONFIG} or weights): {reason}"
        ) from None


def merged_model(recipe, adapter_dir: Path, *, dtype: str | None = None, device_map=None):
    """The recipe's base, unquantized in ``dtype`` (default: the compute dtype), with the adapter folded in."""
    base = load_base_model(recipe, quantize=False, dtype=dtype, device_map=device_map)
    return load_adapter(base, adapter_dir, recipe).merge_and_unload()
