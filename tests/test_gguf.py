"""GGUF export: the file's metadata and tensors read back with gguf-py, and the same greedy tokens as
the Hugging Face model when llama.cpp (llama-cpp-python) runs it."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from codetune.gguf_export import GGUFExportError, export_gguf

from .conftest import PHI3_TOKENIZER, needs_phi3_tokenizer, save_random_model

gguf = pytest.importorskip("gguf")

LLAMA_CPP_MISSING = (
    "llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36: no wheel on PyPI, "
    "it builds llama.cpp from source); the llama.cpp comparison needs it"
)
PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\nclass Config:\n    def __init__(self",
    None,  # the chat prompt of the tiny model's tokenizer, built in the test
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(tiny_dir, out / f"tiny-{t}.gguf", outtype=t) for t in ("f32", "f16")}


def _field(reader, key):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _expected_names(n_layer):
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(n_layer):
        names |= {
            f"blk.{i}.{p}.weight" for p in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
        }
    return names


# ---------------------------------------------------------------------------------------
# The file, read back with gguf-py


def test_metadata_reads_back_as_llama_cpp_phi3(exported, tiny_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    r = gguf.GGUFReader(exported["f16"])
    assert _field(r, "general.architecture") == "phi3"
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert _field(r, "phi3.block_count") == config.num_hidden_layers == 2
    assert _field(r, "phi3.embedding_length") == config.hidden_size
    assert _field(r, "phi3.feed_forward_length") == config.intermediate_size
    assert _field(r, "phi3.attention.head_count") == _field(r, "phi3.attention.head_count_kv") == 4
    assert _field(r, "phi3.context_length") == config.max_position_embeddings
    assert _field(r, "phi3.rope.dimension_count") == config.hidden_size // config.num_attention_heads
    assert _field(r, "phi3.rope.freq_base") == pytest.approx(10000.0)
    assert _field(r, "phi3.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    # the vocabulary: byte-level BPE with the GPT-2 pre-tokenizer, one entry per embedding row
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size
    assert all(tokens[i] == tok.convert_ids_to_tokens(i) for i in range(len(tok)))
    assert len(_field(r, "tokenizer.ggml.merges")) > 500
    types = _field(r, "tokenizer.ggml.token_type")
    assert {types[i] for i in range(8)} == {gguf.TokenType.CONTROL}  # <unk> ... <|user|>
    assert _field(r, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(r, "tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids("<|end|>")
    assert _field(r, "tokenizer.ggml.add_bos_token") is False  # the tiny tokenizer adds no <s>
    # no "phi3" in the name: llama.cpp would strip the newline after <|user|>, which the tiny tokenizer keeps
    assert tiny_dir.name.startswith("tiny-phi3") and not re.search("phi-?3", _field(r, "general.name"), re.I)
    assert _field(r, "tokenizer.chat_template") == tok.chat_template
    # the tensors: Phi-3's fused projections stay fused, norms stay f32
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == _expected_names(2) and len(r.tensors) == 15
    for name, t in tensors.items():
        want = gguf.GGMLQuantizationType.F32 if name.endswith("norm.weight") else gguf.GGMLQuantizationType.F16
        assert t.tensor_type == want, name
    assert list(tensors["blk.0.attn_qkv.weight"].shape) == [128, 3 * 128]  # ggml order: (in, out)
    assert list(tensors["blk.1.ffn_up.weight"].shape) == [128, 2 * 256]
    assert list(tensors["token_embd.weight"].shape) == [128, config.vocab_size]


def test_tensors_are_the_checkpoint_values(exported, tiny_dir):
    from safetensors.torch import load_file

    state = load_file(tiny_dir / "model.safetensors")
    f32 = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(exported["f32"]).tensors}
    f16 = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(exported["f16"]).tensors}
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output.weight": "lm_head.weight",
        "output_norm.weight": "model.norm.weight",
        "blk.1.attn_qkv.weight": "model.layers.1.self_attn.qkv_proj.weight",  # q, k, v rows, unpermuted
        "blk.1.ffn_up.weight": "model.layers.1.mlp.gate_up_proj.weight",  # gate rows, then up rows
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    }
    for name, hf in pairs.items():
        ref = state[hf].float().numpy()
        np.testing.assert_array_equal(f32[name], ref, err_msg=name)
        np.testing.assert_allclose(f16[name].astype(np.float32), ref, rtol=1e-3, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
def test_bf16_and_q8_0_files(tiny_dir, tmp_path, outtype):
    from safetensors.torch import load_file

    path = export_gguf(tiny_dir, tmp_path / f"tiny-{outtype}.gguf", outtype=outtype)
    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    qkv = tensors["blk.0.attn_qkv.weight"]
    assert qkv.tensor_type == qtype and tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    ref = load_file(tiny_dir / "model.safetensors")["model.layers.0.self_attn.qkv_proj.weight"].float().numpy()
    back = gguf.quants.dequantize(qkv.data, qtype).reshape(ref.shape)
    assert np.abs(back - ref).max() <= 0.02 * np.abs(ref).max()


# ---------------------------------------------------------------------------------------
# Bad input


def test_bad_folders_give_clear_errors(tmp_path, tiny_dir):
    out = tmp_path / "out.gguf"
    with pytest.raises(GGUFExportError, match="is not a directory"):
        export_gguf(tmp_path / "nope", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(GGUFExportError, match="no config.json"):
        export_gguf(tmp_path / "empty", out)
    with pytest.raises(GGUFExportError, match="outtype 'q4_k'"):
        export_gguf(tiny_dir, out, outtype="q4_k")

    llama = tmp_path / "llama"
    shutil.copytree(tiny_dir, llama)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(
        json.dumps({**config, "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    no_place = "tensor 'model.layers.0.self_attn.qkv_proj.weight' has no place in llama.cpp's llama"
    with pytest.raises(GGUFExportError, match=no_place):
        export_gguf(llama, out)
    (llama / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"})
    )
    unsupported = r"GPTNeoXForCausalLM \(model_type 'gpt_neox'\); GGUF export supports the families: llama, phi3, qwen2, qwen3"
    with pytest.raises(GGUFExportError, match=unsupported):
        export_gguf(llama, out)

    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(GGUFExportError, match="has no \\*.safetensors"):
        export_gguf(no_weights, out)

    unmerged = tmp_path / "unmerged"
    shutil.copytree(tiny_dir, unmerged)
    from safetensors.torch import load_file, save_file

    state = load_file(unmerged / "model.safetensors")
    state["model.layers.0.self_attn.qkv_proj.lora_A.weight"] = torch.zeros(8, 128)
    save_file(state, unmerged / "model.safetensors")
    with pytest.raises(GGUFExportError, match="LoRA weight: the adapter is not merged"):
        export_gguf(unmerged, out)
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))  # nothing half-written


# ---------------------------------------------------------------------------------------
# llama.cpp runs the file


def _hf_greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[-n:]


def _llama_greedy(llm, ids, n):
    out = []
    for tok in llm.generate(list(ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def _agreement(a, b):
    """How many tokens two greedy continuations share before they first differ."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _compare_with_hf(model_dir, gguf_path, prompts_ids, n_new=NEW_TOKENS):
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, n_threads=2, logits_all=False, verbose=False)
    try:
        agree, pairs = 0, []
        for ids in prompts_ids:
            hf, cpp = _hf_greedy(model, ids, n_new), _llama_greedy(llm, ids, n_new)
            agree += _agreement(hf, cpp)
            pairs.append((hf, cpp))
    finally:
        llm.close()
    return agree, pairs


def _tiny_prompts(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Write a function that returns the sum of a list."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return [tok(p if p is not None else chat, add_special_tokens=False)["input_ids"] for p in PROMPTS]


@pytest.mark.parametrize("outtype, min_agree", [("f32", 1.0), ("f16", 0.75)])
def test_llama_cpp_greedy_tokens_match_transformers(exported, tiny_dir, outtype, min_agree):
    prompts = _tiny_prompts(tiny_dir)
    agree, pairs = _compare_with_hf(tiny_dir, exported[outtype], prompts)
    total = len(prompts) * NEW_TOKENS
    print(f"{outtype}: llama.cpp and transformers agree on {agree}/{total} greedy tokens")
    assert agree >= min_agree * total, pairs


def test_llama_cpp_tokenizes_like_transformers(exported, tiny_dir):
    texts = [
        "def add(a, b):\n    return a + b\n",
        "x = [i ** 2 for i in range(10)]  # squares\n\tprint(x)",
        "'''docstring''' \"quoted\"  it's   spaced\n\n\nend",
        "<|user|>\nSort a list.<|end|>\n<|assistant|>\n",
        "héllo wörld 你好 🚀",
    ]
    _assert_llama_cpp_tokenizes_like_hf(tiny_dir, exported["f16"], texts)


def _assert_llama_cpp_tokenizes_like_hf(model_dir, gguf_path, texts):
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        for text in texts:
            want = tok(text, add_special_tokens=False)["input_ids"]
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            assert got == want, text
            assert llm.detokenize(got, special=True).decode("utf-8") == text
    finally:
        llm.close()


def test_longrope_config_exports_rope_factors(tiny_dir, tmp_path):
    """Phi-3's 128k configs (rope_type longrope): the factors become llama.cpp's rope_factors tensors."""
    src = tmp_path / "longrope"
    shutil.copytree(tiny_dir, src)
    config = json.loads((src / "config.json").read_text())
    half = config["hidden_size"] // config["num_attention_heads"] // 2
    long_f, short_f = [1.0 + 0.5 * i for i in range(half)], [1.0 + 0.05 * i for i in range(half)]
    config.update(
        max_position_embeddings=4 * config["original_max_position_embeddings"],
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 1.0,
            "long_factor": long_f,
            "short_factor": short_f,
        },
    )
    (src / "config.json").write_text(json.dumps(config))
    path = export_gguf(src, tmp_path / "longrope.gguf", outtype="f32")
    r = gguf.GGUFReader(path)
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    np.testing.assert_allclose(tensors["rope_factors_long.weight"], long_f)
    np.testing.assert_allclose(tensors["rope_factors_short.weight"], short_f)
    assert _field(r, "phi3.rope.scaling.original_context_length") == config["original_max_position_embeddings"]
    assert _field(r, "phi3.rope.scaling.attn_factor") == pytest.approx(np.sqrt(1 + np.log(4) / np.log(1024)))
    # llama.cpp (short factors below the original context, like transformers) gives the same tokens
    agree, pairs = _compare_with_hf(src, path, _tiny_prompts(tiny_dir)[:2], n_new=8)
    assert agree == 16, pairs


# ---------------------------------------------------------------------------------------
# A Phi-3-shaped model with the real Phi-3 (SentencePiece) tokenizer


@pytest.fixture(scope="module")
def phi3_sp_dir(tmp_path_factory):
    """A 2-layer Phi-3 with random weights, vocab 32064 and the Phi-3 tokenizer saved by transformers 5
    (which writes tokenizer.json but no tokenizer.model, like `codetune merge`)."""
    from transformers import Phi3ForCausalLM

    from codetune.model import phi3_mini_config

    out = tmp_path_factory.mktemp("phi3-sp") / "model"
    config = phi3_mini_config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    return save_random_model(out, model, PHI3_TOKENIZER)


@needs_phi3_tokenizer
@pytest.mark.parametrize("with_sp_model", [False, True], ids=["tokenizer.json", "tokenizer.model"])
def test_phi3_sentencepiece_vocab(phi3_sp_dir, tmp_path, with_sp_model):
    from transformers import AutoTokenizer

    src = phi3_sp_dir
    if with_sp_model:
        src = tmp_path / "with-sp"
        shutil.copytree(phi3_sp_dir, src)
        shutil.copy(PHI3_TOKENIZER / "tokenizer.model", src)
    r = gguf.GGUFReader(export_gguf(src, tmp_path / "phi3.gguf", outtype="f16"))
    tok = AutoTokenizer.from_pretrained(phi3_sp_dir)
    assert _field(r, "tokenizer.ggml.model") == "llama" and _field(r, "tokenizer.ggml.pre") == "default"
    tokens, scores = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.scores")
    types = _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(scores) == len(types) == 32064
    assert tokens[29871] == "▁" and tokens[13] == "<0x0A>" and types[13] == gguf.TokenType.BYTE
    assert tokens[32000:32011] == tok.convert_ids_to_tokens(list(range(32000, 32011)))
    assert types[32007] == gguf.TokenType.CONTROL and tokens[32063] == "[PAD32063]"
    assert types[32063] == gguf.TokenType.UNUSED
    assert _field(r, "tokenizer.ggml.eos_token_id") == 32000 and _field(r, "tokenizer.ggml.eot_token_id") == 32007
    assert _field(r, "tokenizer.ggml.add_bos_token") is False  # the current Phi-3 tokenizer adds no <s>
    assert _field(r, "tokenizer.ggml.add_space_prefix") is False  # transformers 5: prepend_scheme "first"
    # llama.cpp applies Phi-3's rstrip after <|user|>, <|end|>, ... only when general.name says phi-3
    assert "phi-3" in _field(r, "general.name")
    assert "<|assistant|>" in _field(r, "tokenizer.chat_template")
    # llama.cpp merges the highest score first: the scores must order merges as tokenizer.json ranks them
    assert scores[260] > scores[261] > scores[1000] > scores[20000]  # '▁t', 'er', 'ied', '▁admit'


@needs_phi3_tokenizer
def test_llama_cpp_runs_phi3_shaped_model(phi3_sp_dir, tmp_path):
    from transformers import AutoTokenizer

    path = export_gguf(phi3_sp_dir, tmp_path / "phi3-f32.gguf", outtype="f32")
    tok = AutoTokenizer.from_pretrained(phi3_sp_dir)
    chats = [
        [{"role": "user", "content": "Sort a list."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  def f(x):\n\treturn x\n"}],
        [
            {"role": "user", "content": "Reverse a string."},
            {"role": "assistant", "content": "def rev(s):\n    return s[::-1]"},
            {"role": "user", "content": "héllo 你好 🚀 and   spaces"},
        ],
    ]
    chat_texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    texts = ["def is_prime(n):\n    ", "The quick brown fox", chat_texts[0]]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    agree, pairs = _compare_with_hf(phi3_sp_dir, path, prompts, n_new=8)
    print(f"phi3-shaped f32: llama.cpp and transformers agree on {agree}/{8 * len(texts)} greedy tokens")
    assert agree == 8 * len(texts), pairs

    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        # chat prompts: the same ids (newlines after <|user|>, <|end|>, ... stripped, as Phi-3's tokenizer does)
        for text in chat_texts:
            assert (
                llm.tokenize(text.encode(), add_bos=False, special=True)
                == tok(text, add_special_tokens=False)["input_ids"]
            ), text
        # raw text: the same ids but for the first word, where transformers 5 puts "▁" and llama.cpp
        # cannot without also putting one after every special token (see _spm_adds_prefix)
        for text in ["def add(a, b):\n    return a + b\n", "Hello world, 3.14 é 你好", texts[0]]:
            got = llm.tokenize(text.encode(), add_bos=False, special=True)
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert got[1:] == want[1:] and tok.convert_ids_to_tokens(want[0]) == "▁" + tok.convert_ids_to_tokens(got[0])
    finally:
        llm.close()
