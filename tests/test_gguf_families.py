"""GGUF export of the qwen2 and llama families (separate q/k/v and gate/up, GQA, tied embeddings, Llama 3's
rope scaling and pre-tokenizer), and the export-format registry. The file is read back with gguf-py; where
llama-cpp-python is installed, llama.cpp must give transformers' greedy tokens, as tests/test_gguf.py checks
for phi3."""

import json
import shutil

import numpy as np
import pytest
import torch

from codetune.gguf_export import GGUFExportError, _read_layout, export_gguf

from .conftest import SHARED, save_random_model
from .test_gguf import NEW_TOKENS, _assert_llama_cpp_tokenizes_like_hf, _compare_with_hf, _field

gguf = pytest.importorskip("gguf")

QWEN2_TOKENIZER = SHARED / "tokenizers" / "qwen2"
needs_qwen2_tokenizer = pytest.mark.skipif(
    not (QWEN2_TOKENIZER / "tokenizer.json").exists(),
    reason=f"{QWEN2_TOKENIZER} is absent: ../shared exists beside the repo in CI only, not in a clone",
)
# Llama 3's split regex, as its tokenizer.json has it (digits in runs of up to three).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
FAMILIES = ["qwen2", "llama"]
# The chat prompt ends with the family's own turn header; the code prompts are raw text.
CODE_PROMPTS = ["def fibonacci(n):\n", "import os\n\n\nclass Config:\n    def __init__(self"]


# The builtins share one plain shape (4 KV heads, rope base 10^4: families.tiny_shape; the Llama's head tied, the
# others' not); the export is checked on the shapes the hub's small models have: GQA (4 heads over 2 KV heads of
# 16), the tied head and rope base 10^6 of Qwen2.5-1.5B, an untied Llama (Llama 3.1 8B; tied: tied_llama_dir).
# Random weights (seed 0) and the builtin's tokenizer.
VARIANTS = {
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1e6),
    "llama": dict(tie_word_embeddings=False, rope_theta=1e4),
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    import importlib

    from transformers import AutoModelForCausalLM

    from codetune.families import families, tiny_shape
    from codetune.tiny import build_tiny_tokenizer

    dirs = {}
    for name in FAMILIES:
        tok = build_tiny_tokenizer(family=families()[name])
        shape = tiny_shape(tok, hidden_size=64, intermediate_size=128, num_key_value_heads=2, **VARIANTS[name])
        config = importlib.import_module(f"codetune.families.{name}").full_config(**shape)
        torch.manual_seed(0)
        out = tmp_path_factory.mktemp(f"gguf-{name}") / "model"
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        tok.save_pretrained(out)
        dirs[name] = out
    return dirs


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dirs):
    out = tmp_path_factory.mktemp("gguf-families")
    return {
        (name, t): export_gguf(tiny_dirs[name], out / f"tiny-{name}-{t}.gguf", outtype=t)
        for name in FAMILIES
        for t in ("f32", "f16")
    }


def _prompts(model_dir, texts=CODE_PROMPTS):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Write a function that returns the sum of a list."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return [tok(t, add_special_tokens=False)["input_ids"] for t in [*texts, chat]]


def _block_names(n_layer, *, biases):
    parts = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = {f"blk.{i}.{p}.weight" for i in range(n_layer) for p in parts}
    if biases:
        names |= {f"blk.{i}.attn_{p}.bias" for i in range(n_layer) for p in "qkv"}
    return names


def _deinterleave(rows, heads):
    """llama.cpp's llama q/k row order back to transformers' (the inverse of the export's permutation)."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# ---------------------------------------------------------------------------------------
# The file, read back with gguf-py


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_reads_back(exported, tiny_dirs, family):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_dirs[family])
    tok = AutoTokenizer.from_pretrained(tiny_dirs[family])
    r = gguf.GGUFReader(exported[family, "f16"])
    a = family  # llama.cpp's architecture has the family's name
    assert _field(r, "general.architecture") == a
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert _field(r, f"{a}.block_count") == config.num_hidden_layers == 2
    assert _field(r, f"{a}.embedding_length") == config.hidden_size == 64
    assert _field(r, f"{a}.feed_forward_length") == config.intermediate_size == 128
    # GQA: 4 query heads share 2 key/value heads
    assert (_field(r, f"{a}.attention.head_count"), _field(r, f"{a}.attention.head_count_kv")) == (4, 2)
    assert _field(r, f"{a}.context_length") == config.max_position_embeddings == 1024
    assert _field(r, f"{a}.rope.dimension_count") == 16
    assert _field(r, f"{a}.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert _field(r, f"{a}.rope.freq_base") == pytest.approx({"qwen2": 1e6, "llama": 1e4}[family])
    assert _field(r, f"{a}.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    if family == "llama":  # what the converter adds for llama: the vocab size, and head_dim (config.json has it)
        assert _field(r, "llama.vocab_size") == config.vocab_size
        assert _field(r, "llama.attention.key_length") == _field(r, "llama.attention.value_length") == 16
    # the vocabulary: byte-level BPE, one entry per embedding row. The tiny Qwen2's tokenizer.json says GPT-2's
    # split, but transformers loads a qwen2 folder's as Qwen2Tokenizer, with Qwen2's split; the tiny Llama's
    # says Llama 3's own (families/llama.py), whole words unmerged, as the hub's does
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == {"qwen2": "qwen2", "llama": "llama-bpe"}[family]
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size == 2048
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    types = _field(r, "tokenizer.ggml.token_type")
    n_special = {"qwen2": 3, "llama": 6}[family]  # the family's special tokens take the first ids
    assert {types[i] for i in range(n_special)} == {gguf.TokenType.CONTROL}
    assert types[n_special] == gguf.TokenType.NORMAL
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(r, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    eot = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>"}[family]
    assert _field(r, "tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids(eot)
    if family == "llama":
        assert _field(r, "tokenizer.ggml.bos_token_id") == tok.convert_tokens_to_ids("<|begin_of_text|>")
    else:  # Qwen2 has no bos token
        assert _field(r, "tokenizer.ggml.bos_token_id") is None
    # the tiny tokenizers add nothing; the llama template writes <|begin_of_text|> itself
    assert _field(r, "tokenizer.ggml.add_bos_token") is False
    assert _field(r, "tokenizer.chat_template") == tok.chat_template


@pytest.mark.parametrize("family", FAMILIES)
def test_tensors_names_shapes_and_values(exported, tiny_dirs, family):
    from safetensors.torch import load_file

    state = {k: v.float().numpy() for k, v in load_file(tiny_dirs[family] / "model.safetensors").items()}
    r32 = gguf.GGUFReader(exported[family, "f32"])
    tensors = {t.name: t for t in r32.tensors}
    f32 = {name: np.asarray(t.data) for name, t in tensors.items()}
    f16 = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(exported[family, "f16"]).tensors}

    tied = family == "qwen2"  # tied here, like the small Qwen2.5 models (VARIANTS)
    head = set() if tied else {"output.weight"}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", *head} | _block_names(2, biases=tied)
    assert ("lm_head.weight" in state) is not tied
    # ggml order is (in, out); the 2 KV heads of 16 make k and v 32 rows
    assert list(tensors["blk.0.attn_q.weight"].shape) == [64, 64]
    assert list(tensors["blk.0.attn_k.weight"].shape) == list(tensors["blk.1.attn_v.weight"].shape) == [64, 32]
    assert list(tensors["blk.0.ffn_gate.weight"].shape) == list(tensors["blk.0.ffn_up.weight"].shape) == [64, 128]
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [128, 64]
    assert list(tensors["token_embd.weight"].shape) == [64, 2048]
    for name, t in tensors.items():
        one_d = len(t.shape) == 1
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        if one_d:  # norms and biases stay f32 in the f16 file too
            assert f16[name].dtype == np.float32, name

    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "blk.1.attn_v.weight": "model.layers.1.self_attn.v_proj.weight",
        "blk.1.attn_output.weight": "model.layers.1.self_attn.o_proj.weight",
        "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
        "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    }
    if not tied:
        pairs["output.weight"] = "lm_head.weight"
    for name, hf in pairs.items():
        np.testing.assert_array_equal(f32[name], state[hf], err_msg=name)
        np.testing.assert_allclose(f16[name].astype(np.float32), state[hf], rtol=1e-3, atol=1e-4, err_msg=name)

    q, k = state["model.layers.1.self_attn.q_proj.weight"], state["model.layers.1.self_attn.k_proj.weight"]
    if family == "qwen2":  # NeoX rope in both: q and k as they are, with their biases
        np.testing.assert_array_equal(f32["blk.1.attn_q.weight"], q)
        np.testing.assert_array_equal(f32["blk.1.attn_k.weight"], k)
        for p in "qkv":
            np.testing.assert_array_equal(f32[f"blk.0.attn_{p}.bias"], state[f"model.layers.0.self_attn.{p}_proj.bias"])
    else:  # llama.cpp's llama rotates interleaved pairs: rows reordered within each head (4 for q, 2 for k)
        assert not np.array_equal(f32["blk.1.attn_q.weight"], q)
        np.testing.assert_array_equal(_deinterleave(f32["blk.1.attn_q.weight"], 4), q)
        np.testing.assert_array_equal(_deinterleave(f32["blk.1.attn_k.weight"], 2), k)
        assert sorted(map(tuple, f32["blk.1.attn_k.weight"])) == sorted(map(tuple, k))  # same rows, new order


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_file(tiny_dirs, tmp_path, family):
    from safetensors.torch import load_file

    path = export_gguf(tiny_dirs[family], tmp_path / "q8.gguf", outtype="q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    t = tensors["blk.0.ffn_up.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    ref = load_file(tiny_dirs[family] / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].float().numpy()
    back = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType.Q8_0).reshape(ref.shape)
    assert np.abs(back - ref).max() <= 0.02 * np.abs(ref).max()


# ---------------------------------------------------------------------------------------
# Variants: a tied Llama (Llama 3.2 1B/3B), Llama 3.1's rope scaling, Llama 3's pre-tokenizer


@pytest.fixture(scope="module")
def tied_llama_dir(tiny_dirs, tmp_path_factory):
    """The tiny Llama with its head tied to the embedding, as Llama-3.2-1B has it."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tied-llama") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_dirs["llama"] / f, out)
    return out


def test_tied_llama_has_no_output_tensor(tied_llama_dir, tmp_path):
    path = export_gguf(tied_llama_dir, tmp_path / "tied.gguf", outtype="f32")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert names == {"token_embd.weight", "output_norm.weight"} | _block_names(2, biases=False)
    # llama.cpp then uses token_embd as the head, as transformers does
    agree, pairs = _compare_with_hf(tied_llama_dir, path, _prompts(tied_llama_dir), n_new=8)
    assert agree == 3 * 8, pairs


def _llama3_rope_dir(src, dst):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        # small, so that the tiny model's frequencies span all three of llama3's bands
        "original_max_position_embeddings": 256,
    }
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_llama3_rope_scaling_becomes_rope_freqs(tiny_dirs, tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    src = _llama3_rope_dir(tiny_dirs["llama"], tmp_path / "llama31")
    path = export_gguf(src, tmp_path / "llama31.gguf", outtype="f32")
    r = gguf.GGUFReader(path)
    freqs = {t.name: np.asarray(t.data) for t in r.tensors}["rope_freqs.weight"]
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(src), "cpu")
    plain = 1.0 / (10000.0 ** (np.arange(0, 16, 2) / 16))
    np.testing.assert_allclose(plain / freqs, scaled.numpy(), rtol=1e-5)  # llama.cpp divides each frequency
    assert freqs[0] == pytest.approx(1.0) and freqs[-1] == pytest.approx(8.0)  # high band kept, low band / factor
    assert 1.0 < freqs[3] < 8.0  # ... and one smoothed between them
    agree, pairs = _compare_with_hf(src, path, _prompts(src)[:2], n_new=8)
    assert agree == 16, pairs


def test_other_rope_scalings_are_refused(tiny_dirs, tmp_path):
    src = tmp_path / "yarn"
    shutil.copytree(tiny_dirs["qwen2"], src)
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    (src / "config.json").write_text(json.dumps(config))
    refused = r"rope scaling 'yarn' is not supported for llama.cpp's qwen2 \(supported: default\)"
    with pytest.raises(GGUFExportError, match=refused):
        export_gguf(src, tmp_path / "yarn.gguf")
    assert not (tmp_path / "yarn.gguf").exists()


def _with_pre_tokenizer(src, dst, regex, *, ignore_merges):
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    tj["model"]["ignore_merges"] = ignore_merges
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


TOKENIZER_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "x = [i ** 2 for i in range(1000)]  # squares 12345\n\tprint(x)",
    "'''docstring''' \"quoted\"  it's   spaced I'VE\n\n\nend",
    "héllo wörld 你好 🚀",
]


def test_llama3_pre_tokenizer_is_llama_bpe(tiny_dirs, tmp_path):
    src = _with_pre_tokenizer(tiny_dirs["llama"], tmp_path / "llama3-tok", LLAMA3_REGEX, ignore_merges=True)
    path = export_gguf(src, tmp_path / "llama3-tok.gguf", outtype="f16")
    r = gguf.GGUFReader(path)
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "llama-bpe"
    chat = "<|start_header_id|>user<|end_header_id|>\n\nSum 1234567 digits.<|eot_id|>"
    _assert_llama_cpp_tokenizes_like_hf(src, path, [*TOKENIZER_TEXTS, chat])


def test_unknown_pre_tokenizers_are_refused(tiny_dirs, tmp_path):
    odd = _with_pre_tokenizer(tiny_dirs["llama"], tmp_path / "odd", r"\p{L}+|\s+|.", ignore_merges=False)
    with pytest.raises(GGUFExportError, match=r"tokenizer.json: unsupported pre-tokenizer .*Qwen2's and Llama 3's"):
        export_gguf(odd, tmp_path / "odd.gguf")
    # llama.cpp's llama-bpe always ignores merges for whole words; a tokenizer.json that does not would differ
    merges = _with_pre_tokenizer(tiny_dirs["llama"], tmp_path / "merges", LLAMA3_REGEX, ignore_merges=False)
    with pytest.raises(GGUFExportError, match=r"model.ignore_merges is False, but llama.cpp's 'llama-bpe'"):
        export_gguf(merges, tmp_path / "merges.gguf")
    assert not list(tmp_path.glob("*.gguf"))


# ---------------------------------------------------------------------------------------
# Bad input


def test_unknown_model_type_names_the_supported_families(tiny_dirs, tmp_path):
    src = tmp_path / "mistral"
    shutil.copytree(tiny_dirs["llama"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(
        json.dumps({**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    )
    with pytest.raises(GGUFExportError) as err:
        export_gguf(src, tmp_path / "out.gguf")
    assert str(err.value) == (
        f"{src}: this folder holds MistralForCausalLM (model_type 'mistral'); "
        "GGUF export supports the families: llama, phi3, qwen2, qwen3"
    )
    assert not (tmp_path / "out.gguf").exists()


def test_checkpoint_that_disagrees_with_its_family_is_refused(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    # a config that says llama over Qwen2's weights: the biases have no place in this llama (attention_bias false)
    src = tmp_path / "qwen-as-llama"
    shutil.copytree(tiny_dirs["qwen2"], src)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    refused = r"'model.layers.0.self_attn.k_proj.bias' has no place in llama.cpp's llama"
    with pytest.raises(GGUFExportError, match=refused):
        export_gguf(src, tmp_path / "out.gguf")

    # GQA heads that disagree with config.json
    src = tmp_path / "heads"
    shutil.copytree(tiny_dirs["llama"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(GGUFExportError, match=r"k_proj.weight has shape \[32, 64\], config.json implies \[64, 64\]"):
        export_gguf(src, tmp_path / "out.gguf")

    # an untied model whose head is missing
    src = tmp_path / "no-head"
    shutil.copytree(tiny_dirs["llama"], src)
    state = load_file(src / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, src / "model.safetensors")
    with pytest.raises(GGUFExportError, match=r"the checkpoint lacks output.weight \(GGUF names\)"):
        export_gguf(src, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf"))


# ---------------------------------------------------------------------------------------
# llama.cpp runs the files


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("outtype, min_agree", [("f32", 1.0), ("f16", 0.75)])
def test_llama_cpp_greedy_tokens_match_transformers(exported, tiny_dirs, family, outtype, min_agree):
    prompts = _prompts(tiny_dirs[family])
    agree, pairs = _compare_with_hf(tiny_dirs[family], exported[family, outtype], prompts)
    total = len(prompts) * NEW_TOKENS
    print(f"{family} {outtype}: llama.cpp and transformers agree on {agree}/{total} greedy tokens")
    assert agree >= min_agree * total, pairs


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_tokenizes_like_transformers(exported, tiny_dirs, family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs[family])
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Sort a list."}], tokenize=False, add_generation_prompt=True
    )
    _assert_llama_cpp_tokenizes_like_hf(tiny_dirs[family], exported[family, "f16"], [*TOKENIZER_TEXTS, chat])


# ---------------------------------------------------------------------------------------
# A Qwen2-shaped model with the real Qwen2 tokenizer


@pytest.fixture(scope="module")
def qwen2_real_tok_dir(tmp_path_factory):
    """A 2-layer Qwen2 with random weights, the real vocab size (151936), tied embeddings and the real
    Qwen2 tokenizer."""
    from transformers import Qwen2ForCausalLM

    from codetune.families.qwen2 import full_config

    out = tmp_path_factory.mktemp("qwen2-real") / "model"
    config = full_config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    return save_random_model(out, model, QWEN2_TOKENIZER)


@needs_qwen2_tokenizer
def test_qwen2_real_tokenizer(qwen2_real_tok_dir, tmp_path):
    from transformers import AutoTokenizer

    path = export_gguf(qwen2_real_tok_dir, tmp_path / "qwen2.gguf", outtype="f32")
    tok = AutoTokenizer.from_pretrained(qwen2_real_tok_dir)
    # gguf-py's reader takes minutes over 151,936 tokens and 151,387 merges: the export's own layout reader
    # (checked against gguf-py in test_layout_reader_agrees_with_gguf_py) reads the keys
    keys = {"tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"}
    fields, tensors, _ = _read_layout(path, keys | {"tokenizer.chat_template"})
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    assert fields["tokenizer.ggml.tokens"] == fields["tokenizer.ggml.token_type"] == 151936
    merges = json.loads((qwen2_real_tok_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == len(merges)
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert "output.weight" not in tensors and tensors["token_embd.weight"][1] == (151936, 64)  # tied

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Reverse a string."}], tokenize=False, add_generation_prompt=True
    )
    _assert_llama_cpp_tokenizes_like_hf(qwen2_real_tok_dir, path, [*TOKENIZER_TEXTS, chat])
    agree, pairs = _compare_with_hf(qwen2_real_tok_dir, path, _prompts(qwen2_real_tok_dir), n_new=8)
    assert agree == 3 * 8, pairs


def test_layout_reader_agrees_with_gguf_py(exported):
    """The export's read-back (verify) walks the file with struct; gguf-py's reader must see the same."""
    for path in exported.values():
        keys = {"general.architecture", "llama.block_count", "qwen2.block_count"}
        fields, tensors, data_end = _read_layout(path, keys)
        r = gguf.GGUFReader(path)
        assert fields["general.architecture"] == _field(r, "general.architecture")
        arch = fields["general.architecture"]
        assert fields[f"{arch}.block_count"] == _field(r, f"{arch}.block_count") == 2
        assert fields["tokenizer.ggml.tokens"] == len(_field(r, "tokenizer.ggml.tokens"))
        assert fields["tokenizer.ggml.merges"] == len(_field(r, "tokenizer.ggml.merges"))
        want = {
            t.name: (int(t.tensor_type), tuple(int(d) for d in reversed(t.shape)), int(t.data_offset))
            for t in r.tensors
        }
        assert {n: (q, s, r.data_offset + o) for n, (q, s, o) in tensors.items()} == want
        assert data_end == path.stat().st_size == max(t.data_offset + t.n_bytes for t in r.tensors)


def test_verify_refuses_a_file_unlike_its_plan(exported, tiny_dirs):
    from codetune.families import families
    from codetune.gguf_export import plan_tensors, read_hparams, read_model, read_vocab, verify

    config, plan = read_model(tiny_dirs["llama"])
    hp = read_hparams(config, plan)
    tensors, vocab = plan_tensors(tiny_dirs["llama"], hp, plan, "f32"), read_vocab(tiny_dirs["llama"], hp)
    verify(exported["llama", "f32"], plan, hp, tensors, vocab)  # the file as planned
    differ = r"tensors differ from the plan: blk.0.attn_k.weight, blk.0.attn_output.weight"
    with pytest.raises(GGUFExportError, match=differ):
        verify(exported["llama", "f16"], plan, hp, tensors, vocab)  # f16 tensors where f32 were planned
    with pytest.raises(GGUFExportError, match=r"general.architecture is 'qwen2', not 'llama'"):
        verify(exported["qwen2", "f32"], plan, hp, tensors, vocab)
    assert families()["llama"].gguf_plan is plan


# ---------------------------------------------------------------------------------------
# The export-format registry


def _cli(*args):
    from typer.testing import CliRunner

    from codetune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_export_formats_registry_drives_the_cli(tmp_path):
    from codetune.errors import InputError
    from codetune.export import FORMATS, export

    assert list(FORMATS) == ["gguf", "merged"]
    assert FORMATS["gguf"].supported_families() == "llama, phi3, qwen2, qwen3"
    assert FORMATS["merged"].supported_families() == "every model family"
    assert FORMATS["gguf"].default_outtype == "f16" and FORMATS["merged"].default_outtype == "bfloat16"
    with pytest.raises(InputError, match=r"^--format 'onnx': choose one of gguf, merged$"):
        export(tmp_path, format="onnx")
    wrong_outtype = r"^--outtype 'bfloat16' for --format gguf: choose one of f16, bf16, f32, q8_0$"
    with pytest.raises(InputError, match=wrong_outtype):
        export(tmp_path, format="gguf", outtype="bfloat16")

    res = _cli("export", tmp_path, "--format", "onnx")
    assert res.exit_code != 0 and "error: --format 'onnx': choose one of gguf, merged" in res.output
    res = _cli("export", tmp_path, "--format", "merged", "--outtype", "q8_0")
    assert res.exit_code != 0 and "choose one of bfloat16, float16, float32" in res.output
    help_text = " ".join(_cli("export", "--help").output.split())
    for fmt in FORMATS.values():
        assert f"{fmt.name}:" in help_text and ", ".join(fmt.outtypes) in help_text


def test_export_format_merged_writes_the_model_folder(tiny_run, tmp_path):
    out = tmp_path / "merged-f32"
    res = _cli("export", tiny_run, "--format", "merged", "--outtype", "float32", "--out", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "codetune_merge.json").read_text())["dtype"] == "float32"
    assert json.loads((out / "config.json").read_text())["model_type"] == "phi3"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
