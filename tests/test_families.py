"""Model families: matching on model_type, the generic fallback, each family's facts."""

import json

import pytest

from codetune.families import GENERIC, families, family_for, family_for_source, gguf_families
from codetune.families import qwen2 as qwen2_family
from codetune.families import qwen3 as qwen3_family
from codetune.source import recipe_for_source


def test_family_matched_on_model_type_and_unknown_types_are_generic():
    assert set(families()) == {"phi3", "qwen2", "qwen3", "llama"}
    assert family_for("phi3").name == "phi3"
    assert family_for({"model_type": "qwen2"}).name == "qwen2"
    assert family_for(qwen2_family.full_config()).name == "qwen2"
    assert family_for("llama").name == "llama"
    assert family_for("mistral") is GENERIC and family_for(None) is GENERIC
    assert gguf_families() == ["llama", "phi3", "qwen2", "qwen3"]
    assert family_for(qwen3_family.full_config()).name == "qwen3"


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
    refused = r"MistralForCausalLM \(model_type 'mistral'\); GGUF export supports the families: llama, phi3, qwen2, qwen3"
    with pytest.raises(GGUFExportError, match=refused):
        export_gguf(folder, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


# ---------------------------------------------------------------------------------------
# Discovery: a family is one file in the package, registered nowhere else

NEW_FAMILY = """
from codetune.families import Family, TinySpec
from codetune.families import qwen2

FAMILY = Family(
    name="{name}",
    model_types=({model_types}),
    description="a family written by a test",
    chat_template=None,
    stop_tokens=("<|im_end|>",),
    pad_token="<|endoftext|>",
    turn_end="<|im_end|>",
    lora_targets={{"attention": ("q_proj", "v_proj")}},
    tiny=TinySpec(
        special_tokens=qwen2.SPECIAL_TOKENS,
        bos_token=None,
        eos_token="<|im_end|>",
        unk_token=None,
        pad_token="<|endoftext|>",
        chat_template="{{{{ messages[0]['content'] }}}}",
        config=qwen2.tiny_config,
        version="v1",
    ),
)
"""


@pytest.fixture
def family_folder(tmp_path, monkeypatch):
    """A folder on the families package's search path: a file written there is a family module."""
    import importlib
    import sys

    import codetune.families as package

    folder = tmp_path / "more_families"
    folder.mkdir()
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:  # the modules written here must not outlive the test
        if name.startswith("codetune.families."):
            del sys.modules[name]
    importlib.invalidate_caches()


def _write(folder, module, **fields):
    import importlib

    (folder / f"{module}.py").write_text(NEW_FAMILY.format(**fields))
    importlib.invalidate_caches()


def test_a_new_family_file_is_discovered_matched_and_gets_its_builtin(family_folder):
    from codetune.families import builtin_models, family_named

    _write(family_folder, "mistralish", name="mistralish", model_types='"mistral", "mixtral"')
    assert set(families()) == {"phi3", "qwen2", "qwen3", "llama", "mistralish"}
    fam = family_for("mistral")
    assert fam.name == "mistralish" and family_for({"model_type": "mixtral"}) is fam
    assert family_named("mistralish") is fam and fam.builtin == "builtin:tiny-mistralish"
    assert builtin_models()["builtin:tiny-mistralish"] is fam
    assert family_for_source("builtin:tiny-mistralish") is fam
    assert fam.lora_modules("attention") == ["q_proj", "v_proj"]
    # nothing else changed: the shipped families still match their own types
    assert family_for("qwen2").name == "qwen2" and family_for("phi3").name == "phi3"


def test_helper_modules_are_not_families_and_a_module_without_family_is_named(family_folder):
    from codetune.families import FamilyError

    (family_folder / "_shared.py").write_text("X = 1\n")  # a helper shared by family files
    _write(family_folder, "extra", name="extra", model_types='"extra",')
    assert "extra" in families() and "_shared" not in families()
    (family_folder / "broken.py").write_text("NOT_A_FAMILY = 1\n")
    with pytest.raises(FamilyError, match=r"broken\.py: a model family module must define FAMILY"):
        families()


def test_a_family_that_claims_another_familys_model_type_is_refused(family_folder):
    from codetune.families import FamilyError

    _write(family_folder, "qwen_again", name="qwen_again", model_types='"qwen2",')
    with pytest.raises(FamilyError, match=r"qwen_again\.py: model_type 'qwen2' is already claimed by .*qwen2\.py"):
        family_for("qwen2")


def test_a_family_name_is_one_file(family_folder):
    from codetune.families import FamilyError

    _write(family_folder, "llama_copy", name="llama", model_types='"llama-copy",')
    with pytest.raises(FamilyError, match=r"llama_copy\.py: family name 'llama' is taken by .*llama\.py"):
        families()


def test_the_readmes_family_example_is_one_working_file(family_folder):
    """The example in README's "Model families" section, written as the one file it says is enough."""
    import importlib
    from pathlib import Path

    from codetune.families import builtin_models
    from codetune.tiny import build_tiny_tokenizer

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Model families\n", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (family_folder / "mistral.py").write_text(code)
    importlib.invalidate_caches()
    fam = family_for({"model_type": "mistral"})
    assert fam.name == "mistral" and builtin_models()["builtin:tiny-mistral"] is fam
    tok = build_tiny_tokenizer(family=fam)  # what builtin:tiny-mistral is built from
    messages = [{"role": "user", "content": "Write f()."}, {"role": "assistant", "content": "def f(): pass"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "<s>[INST] Write f(). [/INST]def f(): pass</s>"
    assert tok.convert_tokens_to_ids(fam.turn_end) == tok.eos_token_id and tok.pad_token == fam.pad_token
    config = fam.tiny.config(tok)
    assert family_for(config) is fam and config.vocab_size >= len(tok)


def test_qwen3_17b_all_linear_lora_trains_17_432_576_parameters():
    from codetune.model import count_trainable_lora_params
    from codetune.recipe import load_recipe

    recipe = load_recipe("qwen3-1.7b-python")
    assert recipe.model.name_or_path == "Qwen/Qwen3-1.7B" and recipe.lora.target_modules == "all-linear"
    config = qwen3_family.full_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim) == (2048, 28, 16, 128)
    assert (config.num_key_value_heads, config.intermediate_size, config.attention_bias) == (8, 6144, False)
    trainable, total = count_trainable_lora_params(config, recipe.lora)
    # 28 layers x r=16 x (q 2048+2048, k 2048+1024, v 2048+1024, o 2048+2048, gate/up/down 3 x (2048+6144))
    assert trainable == 28 * 16 * (4096 + 3072 + 3072 + 4096 + 3 * 8192) == 17_432_576
    assert total - trainable == 1_720_574_976  # Qwen3-1.7B: 1.72B with the tied embedding counted once


def test_qwen3_answers_without_thinking(codetune_home):
    """The family's template default: a prompt ends with an empty think block, so the answer is the code;
    the conversation a model trains on renders that block before the answer, so the prompt is its prefix.
    A caller who asks for thinking gets the bare assistant header."""
    from codetune.model import load_tokenizer
    from codetune.recipe import load_recipe

    tok = load_tokenizer(load_recipe("tiny-cpu", ["model.name_or_path=builtin:tiny-qwen3"]))
    user = [{"role": "user", "content": "Write f()."}]
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWrite f().<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    whole = tok.apply_chat_template([*user, {"role": "assistant", "content": "def f(): pass"}], tokenize=False)
    assert whole == prompt + "def f(): pass<|im_end|>\n"
    thinking = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert thinking.endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<think>") != tok.unk_token_id  # one token each, as in Qwen3's vocabulary


def test_a_generation_prompt_that_ends_on_a_token_training_never_had_there_is_named():
    """The tiny Llama once had GPT-2's split: its prompt ended on one "\\n\\n" token where every trained row had
    two "\\n", and one training seed of three answered nothing at all. Llama 3's own split (as the hub's
    tokenizer.json has it) keeps the prompt a token prefix of the conversation; the check tells them apart."""
    import dataclasses

    from codetune.families import families
    from codetune.model import prompt_boundary
    from codetune.tiny import build_tiny_tokenizer

    llama = families()["llama"]
    gpt2_split = dataclasses.replace(llama, tiny=dataclasses.replace(llama.tiny, split_regex=None))
    found = prompt_boundary(build_tiny_tokenizer(family=gpt2_split))
    assert found is not None and "['ĊĊ']" in found and "['Ċ', 'Ċ']" in found
    assert prompt_boundary(build_tiny_tokenizer(family=llama)) is None
    for name in ("phi3", "qwen3"):
        assert prompt_boundary(build_tiny_tokenizer(family=families()[name])) is None, name
