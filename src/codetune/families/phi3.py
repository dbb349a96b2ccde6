"""Phi-3 / Phi-3.5-mini: fused qkv_proj and gate_up_proj, <|end|> closes a turn, GGUF through llama.cpp's phi3."""

from __future__ import annotations

from ..errors import GGUFExportError
from ..templates import PHI3
from . import Family, TinySpec, tiny_shape
from ._gguf import GGUFPlan, generated_tensor

# The Phi-3 special tokens, in Phi-3's order; the tiny tokenizer gives them the first ids.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")


def full_config(**overrides):
    """The Phi-3-mini-4k-instruct architecture (hidden 3072, 32 layers, MLP 8192, vocab 32064)."""
    from transformers import Phi3Config

    base = dict(
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        sliding_window=2047,
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return Phi3Config(**base)


def tiny_config(tokenizer):
    return full_config(**tiny_shape(tokenizer, original_max_position_embeddings=1024, sliding_window=None))


def _gguf_block(hp):
    """llama.cpp's phi3 keeps Phi-3's fused projections: ``qkv_proj`` -> ``attn_qkv`` (rows q, k, v)
    and ``gate_up_proj`` -> ``ffn_up`` (rows gate, then up; llama.cpp's SwiGLU splits it the way
    ``Phi3MLP`` does). Phi-3's rope is the NeoX kind, so q and k are written unpermuted."""
    e, ff, hd = hp["n_embd"], hp["n_ff"], hp["head_dim"]
    return {
        "attn_norm.weight": (e,),
        "attn_qkv.weight": ((hp["n_head"] + 2 * hp["n_head_kv"]) * hd, e),
        "attn_output.weight": (e, hp["n_head"] * hd),
        "ffn_norm.weight": (e,),
        "ffn_up.weight": (2 * ff, e),
        "ffn_down.weight": (e, ff),
    }


def _gguf_metadata(writer, hp):
    import math

    writer.add_rope_scaling_orig_ctx_len(hp["n_ctx_orig"])
    writer.add_sliding_window(hp["sliding_window"])
    if hp["rope_scaling"]:
        scale = hp["n_ctx"] / hp["n_ctx_orig"]
        attn = math.sqrt(1 + math.log(scale) / math.log(hp["n_ctx_orig"])) if scale > 1.0 else 1.0
        writer.add_rope_scaling_attn_factors(float(hp["rope_scaling"].get("attention_factor") or attn))


def _gguf_rope_factors(model_dir, hp):
    """Phi-3's long-context rope ("longrope", formerly "su") as llama.cpp's two factor tensors."""
    scaling = hp["rope_scaling"]
    if not scaling:
        return []
    long_f, short_f = scaling.get("long_factor"), scaling.get("short_factor")
    half = hp["n_rot"] // 2
    if not long_f or not short_f or len(long_f) != half or len(short_f) != half:
        raise GGUFExportError(f"config.json: longrope needs long_factor and short_factor of {half} values each")
    return [
        generated_tensor("rope_scaling.long_factor", "rope_factors_long.weight", long_f),
        generated_tensor("rope_scaling.short_factor", "rope_factors_short.weight", short_f),
    ]


GGUF_PLAN = GGUFPlan(
    arch="phi3",
    architectures=("Phi3ForCausalLM",),
    block=_gguf_block,
    eot_token="<|end|>",
    rope_types=("longrope", "su"),
    metadata=_gguf_metadata,
    extra_tensors=_gguf_rope_factors,
)


FAMILY = Family(
    name="phi3",
    model_types=("phi3",),
    description="Phi-3 and Phi-3.5-mini (microsoft/Phi-3-mini-4k-instruct, ...)",
    chat_template=None,
    stop_tokens=("<|end|>", "<|endoftext|>"),
    pad_token="<|endoftext|>",
    turn_end=None,
    lora_targets={"attention": ("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")},
    default_recipe="phi3-mini-python",
    prompt_example="<|user|>\n{prompt}<|end|>\n<|assistant|>\n",
    tiny=TinySpec(
        special_tokens=SPECIAL_TOKENS,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        chat_template=PHI3,
        config=tiny_config,
        version="v6",  # v6: 2,048 tokens, and the starter families as regenerated
        stop_tokens=("<|end|>",),
    ),
    gguf_plan=GGUF_PLAN,
)
