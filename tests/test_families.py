"""Model families: matching on model_type, the generic fallback, each family's facts."""

import json

import pytest

from codetune.families import GENERIC, families, family_for, family_for_source, gguf_families, recipe_for_source
from codetune.families import qwen2 as qwen2_family


def test_family_matched_on_model_type_and_unknown_types_are_generic():
    assert set(families()) == {"phi3", "qwen2", "llama"}
    assert family_for("phi3").name == "phi3"
    assert family_for({"model_type": "qwen2"}).name == "qwen2"
    assert family_for(qwen2_family.full_config()).name == "qwen2"
    assert family_for("llama").name == "llama"
    assert family_for("mistral") is GENERIC and family_for(None) is GENERIC
    assert gguf_families() == ["phi3", "qwen2", "llama"]


def test_lora_targets_by_role():
    fam = families()["qwen2"]
    assert fam.lora_modules("attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert families()["phi3"].lora_modules("attention", "mlp") == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    with pytest.raises(KeyError, match="no LoRA role 'embeddings'"):
        fam.lora_modules("embeddings")


def _model_folder(tmp_path, model_type):
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def test_a_model_folder_gets_its_familys_recipe(tmp_path):
    assert family_for_source("builtin:tiny-qwen2").name == "qwen2"
    assert recipe_for_source(_model_folder(tmp_path, "phi3")).name == "phi3-mini-python"
    qwen = recipe_for_source(_model_folder(tmp_path, "qwen2"), ["generation.max_new_tokens=7"])
    assert qwen.name == "qwen2.5-coder-1.5b-python" and qwen.generation.max_new_tokens == 7
    # llama has no recipe of its own: phi3-mini-python's settings with Llama-3's tokens
    llama = recipe_for_source(_model_folder(tmp_path, "llama"))
    assert llama.generation.stop_tokens == ["<|eot_id|>", "<|end_of_text|>"]
    assert llama.tokenizer.pad_token == "<|finetune_right_pad_id|>"
    # an unknown type: the tokenizer's own template, pad token and eos (no Phi-3 <|end|>)
    other = recipe_for_source(_model_folder(tmp_path, "mistral"))
    assert other.generation.stop_tokens == [] and other.tokenizer.pad_token is None
    assert other.tokenizer.chat_template is None


def test_no_stop_tokens_means_the_tokenizers_eos(tiny_dir):
    from transformers import AutoTokenizer

    from codetune.model import stop_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert stop_token_ids(tok, []) == [tok.eos_token_id]
    assert stop_token_ids(tok, ["<|end|>"]) == [tok.convert_tokens_to_ids("<|end|>")]


def test_qwen25_coder_15b_all_linear_lora_trains_18_464_768_parameters():
    from codetune.model import count_trainable_lora_params
    from codetune.recipe import load_recipe

    recipe = load_recipe("qwen2.5-coder-1.5b-python")
    assert recipe.lora.target_modules == "all-linear" and recipe.lora.r == 16
    config = qwen2_family.full_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1536, 28, 12)
    assert (config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (2, 8960, 151936)
    assert config.tie_word_embeddings
    trainable, total = count_trainable_lora_params(config, recipe.lora)
    # 28 layers x (q 49,152 + k 28,672 + v 28,672 + o 49,152 + gate/up/down 3 x 167,936)
    assert trainable == 28 * (49_152 + 28_672 + 28_672 + 49_152 + 3 * 167_936) == 18_464_768
    assert total - trainable == 1_543_714_304  # Qwen2.5-1.5B: 1.54B with the tied embedding counted once


def test_qwen_recipe_keeps_the_improved_choices_and_the_phi3_split():
    from codetune.recipe import load_recipe

    qwen, phi3 = load_recipe("qwen2.5-coder-1.5b-python"), load_recipe("phi3-mini-python")
    assert qwen.model.name_or_path == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert (qwen.data.loss_on, qwen.data.packing, qwen.data.dedupe) == ("answer", True, True)
    assert qwen.data.decontaminate == ["test", "humaneval", "mbpp"]
    assert (qwen.data.source, qwen.data.revision, qwen.data.split) == (phi3.data.source, phi3.data.revision, phi3.data.split)
    assert qwen.generation.stop_tokens == ["<|im_end|>", "<|endoftext|>"]


def test_gguf_export_of_an_unsupported_family_names_the_supported_ones(tmp_path):
    pytest.importorskip("gguf")
    from codetune.gguf_export import GGUFExportError, export_gguf

    folder = tmp_path / "mistral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    refused = r"MistralForCausalLM \(model_type 'mistral'\); GGUF export supports the families: phi3, qwen2, llama"
    with pytest.raises(GGUFExportError, match=refused):
        export_gguf(folder, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
