"""The recipe: one typed object that names every knob of a run.

A recipe is YAML on disk and a pydantic model in memory. Every stage reads it, and the
resolved copy saved as ``recipe.yaml`` in a run directory is what that run actually did.
Unknown fields, wrong types and bad combinations fail here, before any work, with a
message that names the field and what is allowed.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .rundir import RunDir, atomic_write, file_problem


class _Yaml12BoolLoader(yaml.SafeLoader):
    """YAML as people write it (YAML 1.2's core schema where 1.1 surprises): booleans are only true/false
    (1.1 reads `save_strategy: no` as False), `2e-4` is a number (1.1 wants `2.0e-4`), and a key given
    twice in one mapping is refused (1.1 keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            _refuse_duplicate_keys(self, node)
        return super().construct_mapping(node, deep=deep)


def _refuse_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    """A key written twice in ``node`` (a merge key ``<<`` may be overridden: that is what it is for)."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node)
        except TypeError:  # an unhashable key: the constructor refuses it with its own message
            continue
        if first is not key_node:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} given twice (first on line {first.start_mark.line + 1}): "
                "a second one would silently replace the first; keep one",
                key_node.start_mark,
            )


# YAML 1.2's floats: 1.0, 1., .5, 2e-4, 1.5E+3, .inf, .nan (1.1 needs a dot and a signed exponent)
_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BoolLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12BoolLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12BoolLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (PyYAML's own message spans several)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{exc.problem}{where}"
    return " ".join(str(exc).split())


__all__ = ["Recipe", "RecipeError", "load_recipe", "save_recipe", "check_integrations", "OPTIMIZERS", "SCHEDULERS"]

# The names transformers 5.24 (pinned) accepts: OptimizerNames and SchedulerType. Spelled out so that
# validating a recipe does not import transformers (seconds); tests/test_recipe.py checks that they equal
# the installed enums, so a transformers upgrade cannot leave them stale.
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit",
    "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit",
    "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb",
    "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor",
    "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo",
    "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw",
    "apollo_adamw_layerwise", "stable_adamw",
)  # fmt: skip
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
)  # fmt: skip
# numpy's and torch's seeds are unsigned 32-bit integers
SEED_MAX = 2**32 - 1
# the Python package each training.report_to integration needs
INTEGRATIONS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# The value of a field whose default is the model family's (codetune.families), resolved by resolve_family
FROM_FAMILY = "family"
FAMILY_FIELDS = ("tokenizer.chat_template", "tokenizer.pad_token", "lora.target_modules", "generation.stop_tokens")


def _only(names: list[str], allowed: list[str], what: str) -> list[str]:
    """``names`` when each is one of ``allowed`` (the registry's, so a new suite module is allowed at once)."""
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown {what}(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
    return names


class _Section(BaseModel):
    # strict: `batch_size: true` or `epochs: "3"` is a mistake, not a 1 or a 3; no inf or nan anywhere
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _utf8_text(cls, value: Any) -> Any:
        # a byte like \xff on the command line arrives as a lone surrogate, which no file can hold as text
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ValueError(
                        f"not UTF-8 text ({exc.reason} at character {exc.start}, e.g. a non-UTF-8 byte given on "
                        "the command line); write it as UTF-8"
                    ) from None
        return value


class ModelConfig(_Section):
    name_or_path: str = Field(description="Hub id, local folder, or builtin:tiny-phi3")
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch)")
    trust_remote_code: bool = False
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"


class TokenizerConfig(_Section):
    name_or_path: str | None = Field(None, description="Defaults to the model's")
    revision: str | None = Field(None, description="Defaults to the model's revision")
    chat_template: str | None = Field(
        FROM_FAMILY,
        description="family = the model family's choice; None = the tokenizer's own; a builtin name (see "
        "codetune.templates) or a Jinja string",
    )
    pad_token: str | None = Field(
        FROM_FAMILY, description="family = the model family's choice; None = the tokenizer's own pad token"
    )
    padding_side: Literal["left", "right"] = "right"
    model_max_length: int | None = Field(None, gt=0)
    # Special tokens added around the rendered chat text when it is tokenized, the way a
    # tokenizer's post-processor does with add_special_tokens=True.
    add_bos_token: bool = False
    add_eos_token: bool = False
    # transformers: AutoTokenizer as transformers 5.24 builds it (for Llama-style files it swaps the
    # tokenizer.json normalizer for its own Metaspace pre-tokenizer). tokenizer_json: tokenizer.json
    # exactly as written, through the `tokenizers` library: the ids transformers 4.40 gave, which
    # keep a "▁" (29871) before each "\n" that follows a special token in Phi-3's 2024-05 files.
    encode_with: Literal["transformers", "tokenizer_json"] = "transformers"
    # A reference tokenizer (codetune.templates.REFERENCE_TOKENIZERS) the given one must match: its own chat
    # template, the text the recipe renders and the ids of a known row and prompt. A mismatch is refused,
    # naming what differs (error), or only warned about (warn: an explicit choice to go on with it).
    reference: Literal["phi3-2024-05"] | None = None
    reference_mismatch: Literal["error", "warn"] = "error"


class QuantizationConfig(_Section):
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"

    @model_validator(mode="after")
    def _storage_only_with_4bit(self) -> QuantizationConfig:
        if not self.load_in_4bit and self.quant_storage != "uint8":
            raise ValueError("quant_storage only applies with load_in_4bit: true")
        return self


class LoraConfig(_Section):
    r: int = Field(16, gt=0, le=1024)
    alpha: int = Field(16, gt=0, le=65536)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # family: every module of the family's roles (attention, mlp); all-linear: PEFT's every linear but the head
    target_modules: list[str] | Literal["all-linear", "family"] = FROM_FAMILY
    # error: a named module that matches no linear layer of the model is refused before any work. allow:
    # the reference notebook names q/k/v_proj, gate/up_proj on a model that fuses them (phi3-mini-python-seed
    # reproduces that on purpose); only a list that matches nothing at all is still refused.
    unmatched_targets: Literal["error", "allow"] = "error"
    bias: Literal["none", "all", "lora_only"] = "none"
    # float32: LoRA weights in fp32, the embeddings and lm_head as prepare_model_for_kbit_training leaves
    # them (fp32). bfloat16: what TRL 0.8.6's SFTTrainer did when training in bf16 on a 4-bit base
    # (peft_module_casting_to_bf16): LoRA weights, embeddings and lm_head in bf16, norms in fp32.
    dtype: Literal["float32", "bfloat16"] = "float32"
    init_from: str | None = Field(
        None,
        description="A LoRA adapter folder to start from instead of fresh LoRA weights (more training of an adapter "
        "on other data); its r and target modules must be this recipe's",
    )

    @model_validator(mode="after")
    def _targets_not_empty(self) -> LoraConfig:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError('target_modules is empty: name modules (e.g. ["qkv_proj", "o_proj"]) or use "all-linear"')
        return self


class SplitConfig(_Section):
    test_size: float | int = Field(0.05, gt=0, description="A share below 1, or a row count (as datasets takes it)")
    seed: int = Field(1234, ge=0, le=SEED_MAX)

    @model_validator(mode="after")
    def _share_or_count(self) -> SplitConfig:
        if isinstance(self.test_size, float) and not self.test_size < 1:
            raise ValueError(f"test_size {self.test_size} must be a share below 1.0 or a whole number of rows")
        return self


class DataConfig(_Section):
    source: str = Field(description="Hub dataset id, local .jsonl/.json/.parquet/.csv file, or 'starter'")
    revision: str | None = None
    hub_split: str = "train"
    format: Literal["alpaca", "chat"] = "alpaca"
    # reference: user = instruction + "\n Input: " + input, exactly as the reference notebook joined them.
    # clean: the input is appended only when it is non-empty, so no dangling "Input:" is trained on.
    formatting: Literal["reference", "clean"] = "clean"
    split: SplitConfig = SplitConfig()
    max_length: int = Field(512, gt=8, le=1_048_576)
    too_long: Literal["truncate", "drop", "error"] = "error"
    packing: bool = False
    loss_on: Literal["all", "answer"] = "answer"
    dedupe: bool = True
    # "test" (the run's own test split) or a suite that declares decontamination texts (codetune.suites)
    decontaminate: list[str] = ["test", "humaneval", "mbpp"]
    decontamination_ngram: int = Field(
        13, ge=4, description="Word n-gram length that counts as overlap (13, as GPT-3's decontamination)"
    )
    # error: an invalid row stops prepare; --skip-invalid sets it aside *before* the split (the split shifts).
    # drop_after_split: split every row as read (row for row the reference's split), then set invalid rows
    # aside from whichever split holds them, counted in stats.json; never stops.
    invalid_rows: Literal["error", "drop_after_split"] = "error"
    # true: every token whose id is the pad token's carries no loss, wherever it stands in a row, as
    # transformers 4.40's DataCollatorForLanguageModeling masked them (with pad = <unk>, a literal
    # "<unk>" in a text is not trained). false: only padding is left out.
    ignore_pad_token_labels: bool = False

    @field_validator("decontaminate")
    @classmethod
    def _known_sources(cls, names: list[str]) -> list[str]:
        from .suites import decontamination_sources

        return _only(names, ["test", *decontamination_sources()], "decontamination source")


class TrainingConfig(_Section):
    optimizer: Literal[OPTIMIZERS] = "paged_adamw_8bit"
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0)
    lr_scheduler: Literal[SCHEDULERS] = "linear"
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    epochs: float = Field(3.0, ge=0.0, le=10_000)
    max_steps: int = Field(-1, ge=-1, le=10**9, description="> 0 overrides epochs")
    batch_size: int = Field(4, gt=0, le=65536)
    eval_batch_size: int = Field(4, gt=0, le=65536)
    gradient_accumulation_steps: int = Field(8, gt=0, le=65536)
    eval_steps: int | None = Field(100, gt=0, description="None = no evaluation during training")
    save_strategy: Literal["steps", "epoch", "no"] = "epoch"
    save_steps: int | None = Field(None, gt=0)
    save_total_limit: int | None = Field(None, gt=0)
    logging_steps: int = Field(100, gt=0)
    seed: int = Field(42, ge=0, le=SEED_MAX)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = True
    max_grad_norm: float = Field(1.0, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    # tokens: the loss of an optimizer step is the mean over every trained token of its accumulated
    # micro-batches (transformers >= 4.46). micro_batch: each micro-batch's mean, divided by
    # gradient_accumulation_steps (transformers 4.40, the reference run): short rows weigh more.
    loss_normalization: Literal["tokens", "micro_batch"] = "tokens"
    # per_epoch: each epoch ends with a shorter accumulation window (transformers 5.24: ceil(batches /
    # accumulation) steps per epoch). across_epochs: windows run on across epoch boundaries and the run
    # makes floor(batches / accumulation) x epochs steps (transformers 4.40: 1,656 for the reference).
    accumulation_windows: Literal["per_epoch", "across_epochs"] = "per_epoch"
    # The attention the model trains with; None: model.attn_implementation (which evaluation uses).
    # flash_attention_2_or_sdpa: flash-attention 2 where it is installed and the GPU supports it (bf16,
    # Ampere or newer), else sdpa with a line that says why (the reference notebook's choice).
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_2_or_sdpa"] | None = None
    # true: the first step's loss is logged on its own, and the first window's logged loss then averages
    # steps 2..logging_steps. false (transformers' default, the reference): it averages steps 1..logging_steps.
    logging_first_step: bool = True

    @model_validator(mode="after")
    def _length_and_cadence(self) -> TrainingConfig:
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0: as written the run would train for no steps")
        if self.save_strategy == "steps" and self.save_steps is None:
            raise ValueError('save_strategy "steps" needs save_steps')
        return self


class GenerationConfig(_Section):
    max_new_tokens: int = Field(256, gt=0, le=1_048_576)
    do_sample: bool = True
    temperature: float = Field(0.3, ge=0.0, le=5.0, description="0 means greedy (do_sample false), as in OpenAI's API")
    top_k: int = Field(50, ge=0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    num_beams: int = Field(1, gt=0, le=64)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    # family: the model family's end-of-turn and end-of-text tokens; []: the tokenizer's eos only
    stop_tokens: list[str] | Literal["family"] = FROM_FAMILY
    seed: int = Field(0, ge=0, le=SEED_MAX)
    # true: answers are decoded as transformers 4.40's text-generation pipeline did
    # (clean_up_tokenization_spaces=True: "from . import" -> "from. import", "do n't" -> "don't").
    clean_up_tokenization_spaces: bool = False

    @model_validator(mode="before")
    @classmethod
    def _zero_temperature_is_greedy(cls, data: Any) -> Any:
        # The API, the CLI, the recipe and the server all take temperature 0 the way OpenAI's API does.
        t = data.get("temperature") if isinstance(data, dict) else None
        if isinstance(t, int | float) and not isinstance(t, bool) and t == 0:
            data = {**data, "do_sample": False}
        return data


class RLConfig(_Section):
    """GRPO after SFT (``codetune rl``): TRL's GRPOTrainer on the run's adapter, rewarded by the sandbox's verdict
    (codetune.reward). The names of TRL's GRPOConfig where one exists."""

    tasks: str = Field(
        "trained",
        description="trained: the starter tasks of the run's training split, with their tests; fresh: new members "
        "of the task families the run was taught, none of them a starter row or a starter-fresh task "
        "(codetune.family_tasks; 20 per family, or rl.max_tasks in all); mbpp-train: "
        "MBPP's train split (ids 601-974, never a test row) from evaluation.mbpp_source; or a .jsonl file of "
        "tasks (prompt, tests, optional task_id, entry_point, setup: docs/rl.md)",
    )
    max_tasks: int | None = Field(None, gt=0, description="At most this many tasks (the first, in id order)")
    filter_samples: int = Field(
        0,
        ge=0,
        le=64,
        description="Difficulty filter: sample each task this many times with the starting policy (at rl.temperature) "
        "and keep those it passes sometimes but not always (0: keep every task; groups without reward spread teach nothing)",
    )
    rollouts: Literal["codetune", "trl", "vllm"] = Field(
        "codetune",
        description="codetune: the completions come from codetune's batched generation (sorted batches, waves, a "
        "static cache on CPU) through the trainer's rollout hook; trl: GRPOTrainer's own generation; vllm: TRL's "
        "vLLM server mode (rl.vllm_server), which needs vLLM importable in the training process (docs/rl.md)",
    )
    vllm_server: str = Field(
        "http://127.0.0.1:8000", description="rl.rollouts vllm: the vLLM server's base URL (TRL's vllm_server_base_url)"
    )
    reward: Literal["all_pass", "pass_fraction"] = "all_pass"
    format_reward: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Weight of a format reward added to the tests' (0: none): 1 when the answer's code parses and "
        "defines the task's function. It pays for form, not behaviour (an empty function earns it): keep it small",
    )
    hold_back_every: int = Field(3, ge=2, description="Every n-th test of a task is measured, never rewarded")
    num_generations: int = Field(4, ge=2, le=64, description="Completions per prompt: one group")
    prompts_per_step: int = Field(2, gt=0, description="Groups per optimizer step")
    max_completion_length: int = Field(128, gt=0, le=65536)
    temperature: float = Field(1.0, gt=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    beta: float = Field(0.0, ge=0.0, description="KL coefficient; 0 loads no reference model")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    epsilon: float = Field(0.2, gt=0.0, lt=1.0)
    epsilon_high: float | None = Field(None, gt=0.0, lt=1.0, description="None: epsilon")
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = True
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0)
    max_steps: int = Field(20, gt=0)
    logging_steps: int = Field(1, gt=0)
    save_steps: int | None = Field(None, gt=0, description="None: no checkpoints")
    seed: int = Field(42, ge=0, le=SEED_MAX)

    @field_validator("filter_samples")
    @classmethod
    def _filter_needs_two(cls, value: int) -> int:
        if value == 1:
            raise ValueError("one sample passes or fails: a pass rate strictly between 0 and 1 needs 2 or more (0: no filter)")
        return value

    @field_validator("tasks")
    @classmethod
    def _tasks_source(cls, value: str) -> str:
        if value in ("trained", "fresh", "mbpp-train") or value.endswith(".jsonl"):
            return value
        raise ValueError(f"use trained, fresh, mbpp-train or a .jsonl file of tasks (got {value!r})")


class EvaluationConfig(_Section):
    samples: int = Field(500, gt=0, description="Test rows scored with ROUGE (the first N)")
    suites: list[str] = Field(["rouge"], description="Names of codetune.suites modules' suites")
    n_samples: int = Field(1, gt=0, description="Completions per task for pass@k")
    batch_size: int = Field(16, gt=0, description="Prompts generated together")
    compare_base: bool = Field(False, description="Also score the base model without the adapter")
    model: Literal["adapter", "merged"] = Field(
        "adapter",
        description="adapter: the 4-bit base plus the unmerged adapter; merged: the adapter merged into the "
        "unquantized base in quantization.compute_dtype (the reference notebook's evaluation)",
    )
    k: list[int] = [1]
    mbpp_source: str = Field(
        "google-research-datasets/mbpp", description="Hub id (config 'full') or a local mbpp.jsonl"
    )
    sandbox: Literal["strict", "auto"] = Field(
        "auto", description="strict: refuse to execute tests without bubblewrap; auto: fall back, with a warning"
    )
    order: Literal["fast", "reference"] = Field(
        "fast",
        description="fast: prompts sorted by length, generated in batches and waves after one reseed; reference: "
        "the reference notebook's draws: set_seed(generation.seed), one warm-up sampled generation of the first "
        "prompt, then every prompt in task order, one at a time (slow)",
    )

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, names: list[str]) -> list[str]:
        from .suites import suite_names

        return _only(names, suite_names(), "suite")

    @model_validator(mode="after")
    def _reference_order_one_at_a_time(self) -> EvaluationConfig:
        if self.order == "reference" and self.batch_size != 1:
            raise ValueError(
                f'evaluation.order "reference" generates one prompt at a time: set evaluation.batch_size 1 '
                f"(got {self.batch_size}), or evaluation.order fast"
            )
        return self

    @model_validator(mode="after")
    def _k_fits_n(self) -> EvaluationConfig:
        too_big = [k for k in self.k if k > self.n_samples or k <= 0]
        if too_big:
            raise ValueError(f"k={too_big} needs 0 < k <= n_samples ({self.n_samples}) to estimate pass@k")
        return self


class Recipe(_Section):
    name: str = Field(description="A plain file name: the default run directory is runs/<name>")
    description: str = ""
    model: ModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    generation: GenerationConfig = GenerationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    rl: RLConfig | None = Field(None, description="GRPO after SFT (codetune rl); None: no RL")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not _PLAIN_NAME.fullmatch(name) or ".." in name:
            raise ValueError(
                "must be a plain file name (letters, digits, '.', '_', '-'; no '/' or '..'; at most 100 "
                "characters): it names the default run directory runs/<name>"
            )
        return name

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        q, t, d = self.quantization, self.training, self.data
        if q.load_in_4bit and q.compute_dtype == "float16" and t.precision == "bf16":
            raise ValueError(
                "quantization.compute_dtype float16 with training.precision bf16 mixes two half types; "
                "set both to bfloat16 (or both to float16)"
            )
        if d.packing and d.too_long == "truncate" and d.loss_on == "answer":
            # A truncated answer-only row can lose every trained token; packing then hides it silently.
            raise ValueError(
                'data.packing with data.loss_on "answer" needs data.too_long "drop" or "error", '
                'not "truncate": a truncated row may keep no answer tokens'
            )
        if self.evaluation.n_samples > 1 and not self.generation.do_sample:
            raise ValueError(
                f"evaluation.n_samples {self.evaluation.n_samples} with generation.do_sample false gives "
                "identical samples: set generation.do_sample true (or n_samples 1)"
            )
        if t.accumulation_windows == "across_epochs" and t.max_steps <= 0 and t.epochs != int(t.epochs):
            raise ValueError(
                f'training.accumulation_windows "across_epochs" needs a whole number of training.epochs '
                f"(got {t.epochs}) or training.max_steps"
            )
        if self.lora.dtype == "bfloat16" and (t.precision not in ("auto", "bf16") or not q.load_in_4bit):
            raise ValueError(
                "lora.dtype bfloat16 is what TRL 0.8.6 did when training in bf16 on a 4-bit base: it needs "
                f"training.precision bf16 or auto (got {t.precision}) and quantization.load_in_4bit true "
                f"(got {str(q.load_in_4bit).lower()})"
            )
        if self.tokenizer.model_max_length and d.max_length > self.tokenizer.model_max_length:
            raise ValueError(
                f"data.max_length ({d.max_length}) exceeds tokenizer.model_max_length "
                f"({self.tokenizer.model_max_length})"
            )
        return self

    # Convenience accessors that resolve defaults which depend on other sections.
    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer.name_or_path or self.model.name_or_path

    @property
    def tokenizer_revision(self) -> str | None:
        if self.tokenizer.name_or_path is None:
            return self.tokenizer.revision or self.model.revision
        return self.tokenizer.revision

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100)


# ---------------------------------------------------------------------------------------
# Loading, overriding and error messages


def shipped_recipes() -> dict[str, str]:
    """Name -> one-line description of each recipe that ships with codetune."""
    out = {}
    for entry in sorted(resources.files("codetune.recipes").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            raw = yaml_load(entry.read_text())
            out[entry.name[: -len(".yaml")]] = (raw.get("description") or "").strip().splitlines()[0]
    return out


def _read_recipe_yaml(name_or_path: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        problem = file_problem(path)
        if problem == "does not exist":
            raise RecipeError(f"recipe file not found: {path}")
        if problem is not None:
            raise RecipeError(f"recipe file {path} {problem}: give a .yaml file")
        try:
            text, where = path.read_bytes().decode("utf-8"), str(path)
        except UnicodeDecodeError as exc:
            raise RecipeError(
                f"recipe file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8"
            ) from None
        except OSError as exc:
            raise RecipeError(f"recipe file {path} cannot be read: {exc.strerror}") from None
    else:
        entry = resources.files("codetune.recipes") / f"{name_or_path}.yaml"
        if not entry.is_file():
            known = ", ".join(shipped_recipes())
            raise RecipeError(f"unknown recipe {name_or_path!r}: shipped recipes are {known}, or give a .yaml path")
        text, where = entry.read_text(), f"shipped recipe {name_or_path}"
    try:
        raw = yaml_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where} is not valid YAML: {yaml_problem(exc)}") from None
    except RecursionError:
        raise RecipeError(f"{where} is nested too deeply to be a recipe") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} must be a YAML mapping of sections (model, data, training, ...)")
    return raw, where


def parse_override(item: str) -> tuple[list[str], Any]:
    """``training.learning_rate=2e-4`` -> (["training", "learning_rate"], 2e-4).

    Values are read as YAML, so numbers, booleans, null and [lists] work as typed.
    """
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected FIELD=VALUE, e.g. training.learning_rate=2e-4")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {item!r}: field path {key!r} is malformed")
    try:
        parsed = yaml_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def _fields_at(loc: tuple) -> list[str]:
    """The field names allowed at a location in the recipe, for 'unknown field' messages."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        info = model.model_fields.get(str(part))
        ann = getattr(info, "annotation", None) if info else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def format_validation_error(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        field = ".".join(str(p) for p in loc) or "(recipe)"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(loc))
            lines.append(f"  {field}: unknown field; allowed here: {allowed}")
        elif err["type"] == "missing":
            lines.append(f"  {field}: required field is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {field}: {msg} (got {_short_repr(err.get('input'))})")
    if len(lines) == 1:  # one problem, one line
        return f"{where}: {lines[0].strip()}"
    return "\n".join([f"{where}: {len(lines)} problem(s)", *lines])


def _short_repr(value: Any) -> str:
    import reprlib

    r = reprlib.Repr()  # Python 3.11's Repr takes no arguments
    r.maxlevel, r.maxstring, r.maxother, r.maxlist, r.maxdict = 3, 60, 60, 6, 6
    try:
        return r.repr(value)
    except RecursionError:
        return "(nested too deeply to show)"


def load_recipe(
    name_or_path: str | Path | Recipe, overrides: list[str] | None = None, *, resolve: bool = True
) -> Recipe:
    """Load a shipped recipe by name, a YAML file or a ``Recipe``, apply ``--set`` overrides, validate, and
    (``resolve``) fill the fields left to the model's family with its values (``resolve_family``)."""
    if isinstance(name_or_path, Recipe):
        if not overrides:
            return resolve_family(name_or_path)[0] if resolve else name_or_path
        raw, where = name_or_path.model_dump(mode="json"), f"recipe {name_or_path.name}"
    else:
        raw, where = _read_recipe_yaml(str(name_or_path))
    raw = apply_overrides(raw, overrides or [])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, where)) from None
    return resolve_family(recipe)[0] if resolve else recipe


def _field(recipe: Recipe, path: str) -> Any:
    section, name = path.split(".")
    return getattr(getattr(recipe, section), name)


def annotated_yaml(recipe: Recipe) -> str:
    """The recipe as YAML, each field left to the model's family kept as ``family`` (so the file still
    follows a model swap) with what it resolves to, and from which family, as a comment."""
    import json

    text = recipe.to_yaml()
    try:
        resolved, filled = resolve_family(recipe)
        notes = {
            p: f"{fam} family: " + ("null (the tokenizer's own)" if v is None else json.dumps(v))
            for p, fam in filled.items()
            for v in [_field(resolved, p)]
        }
    except RecipeError:
        notes = {p: "from the model's family, once its config can be read" for p in FAMILY_FIELDS}
    lines, section = [], None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            section = line.split(":", 1)[0]
        key = line.strip().split(":", 1)[0]
        note = notes.get(f"{section}.{key}")
        if note and line.startswith("  ") and line.rstrip().endswith(f": {FROM_FAMILY}"):
            line = f"{line}  # {note}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def resolve_family(recipe: Recipe) -> tuple[Recipe, dict[str, str]]:
    """``recipe`` with every field that says ``family`` set to the model family's value, and, for each field
    so filled, the family it came from. A field the recipe sets keeps its value. The family is the one of
    ``model.name_or_path`` (a builtin's by name, a folder's or hub id's from its config.json); a hub model
    whose config cannot be read (offline, nothing cached) is an error, since the values would be guesses."""
    pending = [f for f in FAMILY_FIELDS if _field(recipe, f) == FROM_FAMILY]
    if not pending:
        return recipe, {}
    from .families import FamilyConfigError, family_for_source

    try:
        family = family_for_source(recipe.model.name_or_path, revision=recipe.model.revision, strict=True)
    except FamilyConfigError as exc:
        raise RecipeError(
            f"model.name_or_path: {exc}; {', '.join(pending)} say 'family' and need it: connect to the hub "
            "(or point model.name_or_path at a local copy), or set them in the recipe"
        ) from None
    values = family.recipe_values()
    sections: dict[str, dict[str, Any]] = {}
    for path in pending:
        section, name = path.split(".")
        sections.setdefault(section, {})[name] = values[path]
    updates = {name: getattr(recipe, name).model_copy(update=fields) for name, fields in sections.items()}
    return recipe.model_copy(update=updates), dict.fromkeys(pending, family.name)


def save_recipe(recipe: Recipe, run_dir: Path) -> Path:
    # the commands check that they may write into run_dir (RunDir.ensure) before they get here
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return atomic_write(RunDir(run_dir).recipe_file, recipe.to_yaml())


def data_fingerprint(recipe: Recipe) -> str:
    """The SHA-256 of the settings that make a run's data/ (data, tokenizer and model sections): prepare
    records it inside data/, so data/ is known to match the recipe beside it only when the two agree."""
    import hashlib
    import json

    made_from = {key: getattr(recipe, key).model_dump(mode="json") for key in ("data", "tokenizer", "model")}
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode("utf-8")).hexdigest()


def check_integrations(recipe: Recipe) -> None:
    """training.report_to names integrations whose packages are installed (checked before a model loads)."""
    from importlib.util import find_spec

    for name in recipe.training.report_to:
        if not any(find_spec(pkg) is not None for pkg in INTEGRATIONS[name]):
            raise RecipeError(
                f"training.report_to: {name} is not installed (pip install {INTEGRATIONS[name][0]}), "
                f"or remove {name} from training.report_to"
            )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_recipe(named, overrides: Sequence[str], run_dir: Path, *, resume: bool, overwrite: bool):
    """The recipe a train/run command uses in ``run_dir``: the run's own ``recipe.yaml`` is the source of
    truth once the run exists, so ``--resume`` continues exactly what was started and ``train`` after
    ``prepare`` trains what was prepared.

    - no ``recipe.yaml`` yet, or ``--overwrite`` (start over): ``named`` (the recipe argument + ``--set``);
    - a run that has trained, or ``--resume``: the saved recipe; a ``--set`` that changes it is refused;
    - prepared but not trained with the same recipe name: the saved recipe + ``--set``.
    Returns the recipe and a note for the user (or None).
    """
    rd = RunDir(run_dir)
    if overwrite or not rd.recipe_file.is_file():
        return named, None
    saved = load_recipe(rd.recipe_file)
    if resume or rd.is_trained():
        changed = load_recipe(rd.recipe_file, list(overrides))
        if changed != saved:
            old, new = _flat(saved.model_dump(mode="json")), _flat(changed.model_dump(mode="json"))
            diffs = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
            raise RecipeError(
                f"--set changes the recipe of the trained run {rd.path} ({'; '.join(diffs)}): a run keeps the "
                "recipe it started with (its recipe.yaml); drop the --set, pass --overwrite to start over, "
                "or choose another --run-dir"
            )
        note = None if saved.name == named.name else f"using {rd.recipe_file} (recipe {saved.name}), not {named.name}"
        return saved, note
    if saved.name != named.name:
        return named, None  # another recipe: its data is prepared afresh
    return load_recipe(rd.recipe_file, list(overrides)), f"using {rd.recipe_file} (prepared) with the --set given"
