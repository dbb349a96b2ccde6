"""Qwen2 / Qwen2.5 / Qwen2.5-Coder: ChatML (<|im_start|> / <|im_end|>), separate q/k/v and gate/up, GQA."""

from __future__ import annotations

from ..templates import QWEN2
from . import Family, TinySpec, tiny_shape
from ._gguf import GGUFPlan, separate_qkv_block

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def full_config(**overrides):
    """Qwen2.5-Coder-1.5B-Instruct's architecture (hidden 1536, 28 layers, 12 heads, 2 KV heads, tied embeddings)."""
    from transformers import Qwen2Config

    base = dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        bos_token_id=151643,
        eos_token_id=151645,
        tie_word_embeddings=True,
    )
    base.update(overrides)
    return Qwen2Config(**base)


def tiny_config(tokenizer):
    return full_config(**tiny_shape(tokenizer))


def _gguf_block(hp):
    # Qwen2's q, k and v always have biases (its config has no switch for them); the rope is the NeoX
    # kind in both transformers and llama.cpp's qwen2, so nothing is permuted.
    return separate_qkv_block(hp, qkv_bias=True)


# Small Qwen2.5 models tie the head to the embedding: no output.weight then, llama.cpp reuses token_embd.
GGUF_PLAN = GGUFPlan(arch="qwen2", architectures=("Qwen2ForCausalLM",), block=_gguf_block, eot_token="<|im_end|>")


FAMILY = Family(
    name="qwen2",
    model_types=("qwen2",),
    description="Qwen2, Qwen2.5 and Qwen2.5-Coder (Qwen/Qwen2.5-Coder-1.5B-Instruct, ...)",
    chat_template=None,
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    pad_token="<|endoftext|>",
    turn_end="<|im_end|>",
    lora_targets={"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")},
    default_recipe="qwen2.5-coder-1.5b-python",
    prompt_example=None,  # the card renders one turn with the run's own template (its system turn included)
    tiny=TinySpec(
        special_tokens=SPECIAL_TOKENS,
        bos_token=None,
        eos_token="<|im_end|>",  # as the hub's Qwen2.5 instruct tokenizers
        unk_token=None,
        pad_token="<|endoftext|>",
        chat_template=QWEN2,
        config=tiny_config,
        version="v4",  # v4: tiny_shape's width 128, 4 KV heads, untied, 600 pre-training steps
        stop_tokens=("<|endoftext|>",),
    ),
    gguf_plan=GGUF_PLAN,
)
