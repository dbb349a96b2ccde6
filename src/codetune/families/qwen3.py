"""Qwen3: ChatML with a thinking switch, q/k RMSNorm per head, no attention bias, GQA.

A coder fine-tune answers without a think block: the family sets ``enable_thinking`` false by default
in the chat template (``template_defaults``), so a prompt ends with an empty think block and the answer
that follows is the code.
"""

from __future__ import annotations

from ..templates import QWEN3
from . import Family, TinySpec, tiny_shape
from ._gguf import GGUFPlan, separate_qkv_block

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def full_config(**overrides):
    """Qwen3-1.7B's architecture (hidden 2048, 28 layers, 16 heads of 128, 8 KV heads, tied embeddings)."""
    from transformers import Qwen3Config

    base = dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        attention_bias=False,
        bos_token_id=151643,
        eos_token_id=151645,
        tie_word_embeddings=True,
    )
    base.update(overrides)
    return Qwen3Config(**base)


def tiny_config(tokenizer):
    shape = tiny_shape(tokenizer)
    # Qwen3 names its head size (128 by default): the tiny one divides its width among its heads
    return full_config(**shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"])


def _gguf_block(hp):
    # llama.cpp's qwen3: Qwen2's block without the q/k/v biases, plus an RMSNorm over each head of q and k
    shapes = separate_qkv_block(hp, qkv_bias=hp["attention_bias"], out_bias=hp["attention_bias"])
    shapes.update({"attn_q_norm.weight": (hp["head_dim"],), "attn_k_norm.weight": (hp["head_dim"],)})
    return shapes


GGUF_PLAN = GGUFPlan(arch="qwen3", architectures=("Qwen3ForCausalLM",), block=_gguf_block, eot_token="<|im_end|>")


FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    description="Qwen3 (Qwen/Qwen3-1.7B, Qwen/Qwen3-0.6B, ...), answering without thinking",
    chat_template=None,
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    pad_token="<|endoftext|>",
    turn_end="<|im_end|>",
    lora_targets={"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")},
    default_recipe="qwen3-1.7b-python",
    prompt_example=None,  # the card renders one turn with the run's own template
    template_defaults={"enable_thinking": False},
    tiny=TinySpec(
        special_tokens=SPECIAL_TOKENS,
        bos_token=None,
        eos_token="<|im_end|>",  # as the hub's Qwen3 tokenizers
        unk_token=None,
        pad_token="<|endoftext|>",
        chat_template=QWEN3,
        config=tiny_config,
        version="v2",  # v2: tiny_shape's width 128, 4 KV heads, untied, 600 pre-training steps
        stop_tokens=("<|endoftext|>",),
    ),
    gguf_plan=GGUF_PLAN,
)
