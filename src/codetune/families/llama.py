"""Llama-3.x-style models: <|begin_of_text|>, a header per turn, <|eot_id|>; separate q/k/v and gate/up, GQA.

The stop and pad tokens are Llama-3's. Other ``llama`` model types with older vocabularies
(CodeLlama, DeepSeek-Coder) need ``generation.stop_tokens`` and ``tokenizer.pad_token`` set in the recipe.
"""

from __future__ import annotations

from ..templates import LLAMA3
from . import Family, TinySpec, tiny_shape
from ._gguf import GGUFPlan, generated_tensor, separate_qkv_block

SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
)


# Llama 3's tokenizer.json split: letters, digits in runs of up to three, and every run of newlines one piece
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def full_config(**overrides):
    """Llama-3.2-1B's architecture (hidden 2048, 16 layers, 32 heads, 8 KV heads, vocab 128256)."""
    from transformers import LlamaConfig

    base = dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=128009,
        tie_word_embeddings=True,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def tiny_config(tokenizer):
    # Tied, as Llama 3.2 1B and 3B are. Llama 3's split makes "_costs" of `go_costs` one token, seen in
    # pre-training never; LoRA leaves an untied head's row for it random, so the fine-tune could not write
    # a name it had to copy from the instruction (9.1 and 29.5 held-out pass@1 untied; 79.5 and 90.9 tied).
    return full_config(**tiny_shape(tokenizer, tie_word_embeddings=True))


def _gguf_block(hp):
    return separate_qkv_block(
        hp, qkv_bias=hp["attention_bias"], out_bias=hp["attention_bias"], mlp_bias=hp["mlp_bias"]
    )


def _gguf_metadata(writer, hp):
    writer.add_vocab_size(hp["n_vocab"])


def _gguf_rope_freqs(model_dir, hp):
    """Llama 3.1+'s "llama3" rope scaling as llama.cpp's rope_freqs tensor: per rotated pair, the
    divisor of its frequency. transformers computes the scaled frequencies; the divisor is the
    unscaled frequency over the scaled one."""
    if not hp["rope_scaling"]:
        return []
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(str(model_dir))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = hp["n_rot"]
    plain = 1.0 / (hp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return [generated_tensor("rope_parameters.llama3", "rope_freqs.weight", (plain / scaled).tolist())]


# llama.cpp's llama rotates interleaved pairs where transformers rotates halves: the converter
# reorders the rows of q and k (per head), and so does the export.
GGUF_PLAN = GGUFPlan(
    arch="llama",
    architectures=("LlamaForCausalLM",),
    block=_gguf_block,
    permute_qk=True,
    eot_token="<|eot_id|>",
    rope_types=("llama3",),
    metadata=_gguf_metadata,
    extra_tensors=_gguf_rope_freqs,
)


FAMILY = Family(
    name="llama",
    model_types=("llama",),
    description="Llama-3.x-style models (meta-llama/Llama-3.2-1B-Instruct, ...)",
    chat_template=None,
    stop_tokens=("<|eot_id|>", "<|end_of_text|>"),
    pad_token="<|finetune_right_pad_id|>",
    turn_end="<|eot_id|>",
    lora_targets={"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")},
    default_recipe=None,
    prompt_example=None,  # the card renders one turn with the run's own template (its bos included)
    tiny=TinySpec(
        special_tokens=SPECIAL_TOKENS,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        unk_token=None,
        pad_token="<|finetune_right_pad_id|>",
        chat_template=LLAMA3,
        config=tiny_config,
        version="v6",  # v6: tied head; v5: Llama 3's split regex; v4: tiny_shape's width 128, 4 KV heads
        split_regex=LLAMA3_SPLIT,
        stop_tokens=("<|end_of_text|>",),
    ),
    gguf_plan=GGUF_PLAN,
)
