"""``codetune export``: a merged Phi-3 model folder as one GGUF file for llama.cpp and Ollama.

The file is written with the ``gguf`` package (gguf-py, published by the llama.cpp project): its
``GGUFWriter`` writes the format, its ``TensorNameMap`` names the tensors, its ``SpecialVocab``
reads the merges and the chat template, its ``quants`` module makes bf16 and q8_0. What codetune
adds is what llama.cpp's ``convert_hf_to_gguf.py`` would add for ``Phi3ForCausalLM``: the ``phi3``
hyperparameters and a vocabulary in the form llama.cpp expects. We do not run that script because
it cannot read what we write: it wants a SentencePiece ``tokenizer.model``, which
``save_pretrained`` in transformers 5 no longer writes, and it rejects any byte-level BPE
pre-tokenizer it does not know by hash (the tiny model's).

llama.cpp's ``phi3`` keeps Phi-3's fused projections: ``self_attn.qkv_proj`` becomes
``blk.N.attn_qkv`` (rows q, k, v) and ``mlp.gate_up_proj`` becomes ``blk.N.ffn_up`` (rows gate, then
up; llama.cpp's SwiGLU splits it the way ``Phi3MLP`` does). Phi-3's rope is the NeoX kind, so q and
k are written unpermuted.

Two tokenizers are supported:

* SentencePiece-style (``tokenizer.json`` BPE with byte fallback: Phi-3, Llama 2) -> ``llama``.
  Scores come from ``tokenizer.model`` when the folder has one, else from the merge ranks of
  ``tokenizer.json`` (llama.cpp's SPM tokenizer merges the highest score first, HF the lowest rank).
* GPT-2-style byte-level BPE (``ByteLevel`` pre-tokenizer with its regex: the tiny model) ->
  ``gpt2`` with pre-tokenizer ``gpt-2``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .families import families, family_for, gguf_families
from .recipe import RecipeError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURE = "Phi3ForCausalLM"


class GGUFExportError(RecipeError):
    """A model folder that cannot be exported to GGUF, with a message meant for the user."""


@dataclass(frozen=True)
class _Tensor:
    hf_name: str
    name: str  # GGUF name
    file: Path | None  # safetensors file; None for a generated tensor (rope factors)
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    values: tuple[float, ...] | None = None  # the data of a generated tensor


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a dependency
        raise GGUFExportError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GGUFExportError(f"{path} is not valid JSON: {exc}") from None


# ---------------------------------------------------------------------------------------
# Config -> phi3 hyperparameters


def _gguf_family(config: dict):
    """The config's model family; a config that names Phi3ForCausalLM without a model_type is Phi-3's."""
    family = family_for(config)
    if family.gguf_plan is None and ARCHITECTURE in (config.get("architectures") or []):
        return families()["phi3"]
    return family


def _check_folder(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise GGUFExportError(f"{model_dir} is not a directory: give a merged model folder (`codetune merge`)")
    if not (model_dir / "config.json").is_file():
        raise GGUFExportError(
            f"{model_dir} has no config.json: it is not a Hugging Face model folder. "
            "A run directory must be merged first (`codetune merge RUN_DIR`)"
        )
    if (model_dir / "adapter_config.json").is_file():
        raise GGUFExportError(f"{model_dir} is a LoRA adapter, not a model: merge it first (`codetune merge RUN_DIR`)")
    config = _read_json(model_dir / "config.json")
    archs = config.get("architectures") or []
    family = _gguf_family(config)
    if family.gguf_plan is None:
        raise GGUFExportError(
            f"{model_dir}: GGUF export supports {ARCHITECTURE} only; this folder holds "
            f"{', '.join(archs) or config.get('model_type') or 'an unknown architecture'} "
            f"(model family {family.name}; GGUF export supports the families: {', '.join(gguf_families())})"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise GGUFExportError(f"{model_dir}: hidden_act {config['hidden_act']!r} is not Phi-3's silu")
    if config.get("quantization_config"):
        raise GGUFExportError(
            f"{model_dir} holds quantized weights ({config['quantization_config'].get('quant_method', '?')}): "
            "export an unquantized merge (`codetune merge` writes bf16)"
        )
    if not (model_dir / "tokenizer.json").is_file():
        raise GGUFExportError(f"{model_dir} has no tokenizer.json: the GGUF file needs the tokenizer")
    return config


def _rope(config: dict) -> tuple[float, float, dict | None]:
    """(rope_theta, partial_rotary_factor, scaling or None) from a transformers 4 or 5 config."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or None
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    return float(theta), float(partial), scaling


def _hparams(config: dict) -> dict:
    try:
        n_embd = int(config["hidden_size"])
        n_head = int(config["num_attention_heads"])
        hp = dict(
            n_embd=n_embd,
            n_ff=int(config["intermediate_size"]),
            n_layer=int(config["num_hidden_layers"]),
            n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            n_ctx=int(config["max_position_embeddings"]),
            n_ctx_orig=int(config.get("original_max_position_embeddings") or config["max_position_embeddings"]),
            rms_eps=float(config["rms_norm_eps"]),
            n_vocab=int(config["vocab_size"]),
            sliding_window=int(config.get("sliding_window") or 0),
            tied=bool(config.get("tie_word_embeddings", False)),
        )
    except KeyError as exc:
        raise GGUFExportError(f"config.json lacks {exc.args[0]!r}, which a Phi-3 config has") from None
    hp["rope_theta"], partial, hp["rope_scaling"] = _rope(config)
    hp["n_rot"] = int(partial * n_embd) // n_head
    return hp


# ---------------------------------------------------------------------------------------
# Tensors


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index)["weight_map"].values()))
        files = [model_dir / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise GGUFExportError(f"{model_dir}: shards named in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = "pytorch_model.bin" if (model_dir / "pytorch_model.bin").is_file() else "no weights"
        raise GGUFExportError(
            f"{model_dir} has no *.safetensors ({found}): save the model with safetensors (`codetune merge` does)"
        )
    return files


def _plan_tensors(model_dir: Path, hp: dict, outtype: str) -> list[_Tensor]:
    """Every tensor of the GGUF file: its GGUF name, source, shape and ggml type, in llama.cpp's order."""
    gguf = _gguf()
    from safetensors import safe_open

    arch = gguf.MODEL_ARCH.PHI3
    name_map = gguf.get_tensor_name_map(arch, hp["n_layer"])
    allowed = set(gguf.MODEL_TENSORS[arch])
    wanted = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[outtype]

    tensors: list[_Tensor] = []
    for file in _safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for hf_name in f.keys():
                if hf_name.endswith(".rotary_emb.inv_freq"):
                    continue  # a buffer some checkpoints carry; llama.cpp computes it
                if "lora_" in hf_name or ".base_layer." in hf_name:
                    raise GGUFExportError(
                        f"{file}: tensor {hf_name!r} is a LoRA weight: the adapter is not merged "
                        "(`codetune merge RUN_DIR` folds it in)"
                    )
                found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
                if found is None or found[0] not in allowed:
                    raise GGUFExportError(f"{file}: tensor {hf_name!r} has no place in llama.cpp's phi3 model")
                name = found[1]
                shape = tuple(f.get_slice(hf_name).get_shape())
                # Norms and other 1-D tensors stay f32, as llama.cpp's converter keeps them.
                if len(shape) <= 1 or name.endswith("_norm.weight"):
                    qtype = gguf.GGMLQuantizationType.F32
                elif wanted == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
                    qtype = gguf.GGMLQuantizationType.F16  # q8_0 blocks are 32 wide; the converter falls back too
                else:
                    qtype = wanted
                tensors.append(_Tensor(hf_name, name, file, shape, qtype))

    names = {t.name for t in tensors}
    if len(names) != len(tensors):
        raise GGUFExportError(f"{model_dir}: two checkpoint tensors map to the same GGUF tensor")
    required = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{part}.weight"
        for i in range(hp["n_layer"])
        for part in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
    }
    if not hp["tied"]:
        required.add("output.weight")
    missing = sorted(required - names)
    if missing:
        raise GGUFExportError(
            f"{model_dir}: the checkpoint lacks {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} "
            "(llama.cpp's phi3 needs the fused self_attn.qkv_proj and mlp.gate_up_proj of Phi3ForCausalLM)"
        )
    by_name = {t.name: t for t in tensors}
    n_embd, n_ff, n_head, n_head_kv = hp["n_embd"], hp["n_ff"], hp["n_head"], hp["n_head_kv"]
    head_dim = n_embd // n_head
    expect = {"token_embd.weight": (hp["n_vocab"], n_embd), "output_norm.weight": (n_embd,)}
    if not hp["tied"]:
        expect["output.weight"] = (hp["n_vocab"], n_embd)
    for i in range(hp["n_layer"]):
        expect[f"blk.{i}.attn_qkv.weight"] = ((n_head + 2 * n_head_kv) * head_dim, n_embd)
        expect[f"blk.{i}.ffn_up.weight"] = (2 * n_ff, n_embd)
        expect[f"blk.{i}.ffn_down.weight"] = (n_embd, n_ff)
    for name, shape in expect.items():
        if by_name[name].shape != shape:
            raise GGUFExportError(
                f"{model_dir}: {by_name[name].hf_name} has shape {list(by_name[name].shape)}, "
                f"config.json implies {list(shape)}"
            )

    # The converter's order: embeddings, block by block, then the output norm and head.
    def order(t: _Tensor):
        if t.name.startswith("blk."):
            return (1, int(t.name.split(".")[1]), t.name)
        return (0 if t.name.startswith("token_embd") else 2, 0, t.name)

    tensors.sort(key=order)
    return _rope_factor_tensors(hp) + tensors


def _rope_factor_tensors(hp: dict) -> list[_Tensor]:
    """Phi-3's long-context rope ("longrope", formerly "su") as llama.cpp's two factor tensors."""
    gguf = _gguf()
    scaling = hp["rope_scaling"]
    if not scaling:
        return []
    kind = str(scaling.get("rope_type") or scaling.get("type") or "").lower()
    if kind not in ("longrope", "su"):
        raise GGUFExportError(f"config.json: rope scaling {kind or '?'!r} is not supported (only Phi-3's longrope)")
    long_f, short_f = scaling.get("long_factor"), scaling.get("short_factor")
    half = hp["n_rot"] // 2
    if not long_f or not short_f or len(long_f) != half or len(short_f) != half:
        raise GGUFExportError(f"config.json: longrope needs long_factor and short_factor of {half} values each")
    f32 = gguf.GGMLQuantizationType.F32
    return [
        _Tensor("rope_scaling.long_factor", "rope_factors_long.weight", None, (half,), f32, tuple(long_f)),
        _Tensor("rope_scaling.short_factor", "rope_factors_short.weight", None, (half,), f32, tuple(short_f)),
    ]


def _nbytes_and_shape(t: _Tensor):
    """(byte count, shape for add_tensor_info, numpy dtype) of a tensor once converted to t.qtype."""
    import numpy as np

    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    n = math.prod(t.shape)
    if t.qtype == Q.F32:
        return 4 * n, t.shape, np.dtype(np.float32)
    if t.qtype == Q.F16:
        return 2 * n, t.shape, np.dtype(np.float16)
    byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
    return math.prod(byte_shape), byte_shape, np.dtype(np.uint8)


def _load(t: _Tensor, handles: dict):
    """The tensor's data, converted to t.qtype, as the numpy array GGUFWriter writes."""
    import numpy as np
    import torch

    gguf = _gguf()
    if t.file is None:
        data = np.asarray(t.values, dtype=np.float32)
    else:
        data = handles[t.file].get_tensor(t.hf_name).to(torch.float32).numpy()
    Q = gguf.GGMLQuantizationType
    if t.qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if t.qtype == Q.F16:
        return np.ascontiguousarray(data.astype(np.float16))
    return gguf.quants.quantize(data, t.qtype)


# ---------------------------------------------------------------------------------------
# Vocabulary


@dataclass
class _Vocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: bool  # whether tokenizer.ggml.merges is needed


def _tokenizer_kind(tj: dict, model_dir: Path) -> str:
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(
            f"{model_dir}/tokenizer.json: a {model.get('type')!r} tokenizer is not supported (BPE only)"
        )
    if model.get("byte_fallback"):
        return "spm"
    pre = tj.get("pre_tokenizer") or {}
    decoder = tj.get("decoder") or {}
    if (
        pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and decoder.get("type") == "ByteLevel"
    ):
        return "gpt2"
    raise GGUFExportError(
        f"{model_dir}/tokenizer.json: unsupported pre-tokenizer {json.dumps(pre)[:200]}. GGUF export supports "
        "Phi-3's SentencePiece-style tokenizer and GPT-2-style byte-level BPE (ByteLevel with its regex, "
        "add_prefix_space=false); llama.cpp would need to know any other pre-tokenizer by name"
    )


def _build_vocab(model_dir: Path, tj: dict, tokenizer, n_vocab: int) -> _Vocab:
    gguf = _gguf()
    T = gguf.TokenType
    kind = _tokenizer_kind(tj, model_dir)
    model = tj["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    id_to_text = {i: t for t, i in vocab.items()}
    for i, a in added.items():
        id_to_text[i] = a["content"]
    top = max(id_to_text)
    if top >= n_vocab:
        raise GGUFExportError(
            f"{model_dir}: the tokenizer has token id {top}, but the model's embedding has only {n_vocab} rows"
        )
    missing = [i for i in range(top + 1) if i not in id_to_text]
    if missing:
        raise GGUFExportError(f"{model_dir}/tokenizer.json: token ids {missing[:5]} are missing from the vocabulary")

    special_ids = {
        i
        for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id)
        if i is not None
    }
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in id_to_text:  # the embedding's padding rows (Phi-3: 32011 tokens, 32064 rows)
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        text = id_to_text[i]
        tokens.append(text)
        if i in added:  # as the converter does: added tokens are control (special) or user-defined
            looks_special = text.startswith("<|") and text.endswith("|>")
            types.append(T.CONTROL if added[i].get("special") or looks_special or i in special_ids else T.USER_DEFINED)
        elif i == tokenizer.unk_token_id:
            types.append(T.UNKNOWN)
        elif kind == "spm" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)

    if kind == "gpt2":
        return _Vocab("gpt2", "gpt-2", tokens, types, None, merges=True)

    # SentencePiece (llama.cpp's "llama" vocabulary): scores decide the merge order.
    scores = _spm_scores(model_dir, model, tokens, types)
    return _Vocab("llama", "default", tokens, types, scores, merges=False)


def _spm_scores(model_dir: Path, model: dict, tokens: list[str], types: list[int]) -> list[float]:
    gguf = _gguf()
    T = gguf.TokenType
    sp_path = model_dir / "tokenizer.model"
    scores = [0.0] * len(tokens)
    if sp_path.is_file():
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor()
        sp.LoadFromFile(str(sp_path))
        for i in range(sp.vocab_size()):
            if i < len(tokens) and sp.IdToPiece(i) == tokens[i]:
                scores[i] = sp.GetScore(i)
            elif i < len(tokens):
                raise GGUFExportError(
                    f"{sp_path}: piece {i} is {sp.IdToPiece(i)!r} but tokenizer.json has {tokens[i]!r}"
                )
    else:
        # llama.cpp's SPM tokenizer merges the adjacent pair whose result has the highest score; HF's
        # BPE merges the pair of lowest rank. Scoring each token by minus the rank of the merge that
        # makes it gives the same order (this is how the HF files were derived from tokenizer.model).
        rank: dict[str, int] = {}
        for r, pair in enumerate(model.get("merges", [])):
            a, b = pair.split(" ", 1) if isinstance(pair, str) else pair
            rank.setdefault(a + b, r)
        for i, text in enumerate(tokens):
            if types[i] == T.NORMAL and text in rank:
                scores[i] = -float(rank[text] + 1)
            elif types[i] == T.NORMAL:
                scores[i] = -1e9 if len(text) > 1 else 0.0  # never made by a merge
    for i, ty in enumerate(types):
        if ty == T.UNUSED:
            scores[i] = -10000.0  # the converter's score for padding rows
        elif ty in (T.CONTROL, T.USER_DEFINED):
            scores[i] = -1000.0  # the converter's score for added tokens
    return scores


def _adds_special(tokenizer, token_id: int | None, first: bool) -> bool:
    """Whether the HF tokenizer puts this token at the start (first) / end of an encoded text."""
    if token_id is None:
        return False
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and (ids[0] if first else ids[-1]) == token_id


# ---------------------------------------------------------------------------------------
# Export


def export_gguf(model_dir: Path, out_file: Path, *, outtype: str = "f16", log=None, overwrite: bool = False) -> Path:
    """Write the merged Phi-3 model folder ``model_dir`` as the GGUF file ``out_file``.

    ``outtype``: ``f32``, ``f16`` (default), ``bf16`` or ``q8_0``; norms and other 1-D tensors are
    always f32. The file is written in a fresh staging folder beside ``out_file`` and renamed into
    place at the end; an existing ``out_file`` is replaced only with ``overwrite`` and only if it is GGUF.
    """
    from .export import is_gguf_file
    from .rundir import check_target, staged_file

    gguf = _gguf()
    from transformers import AutoTokenizer

    model_dir, out_file = Path(model_dir), Path(out_file)
    target_rules = dict(overwrite=overwrite, protect=[model_dir], ours=is_gguf_file, what="GGUF output")
    check_target(out_file, "gguf", **target_rules)
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    config = _check_folder(model_dir)
    hp = _hparams(config)
    tensors = _gguf_family(config).gguf_plan(model_dir, hp, outtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise GGUFExportError(f"{model_dir}: cannot load its tokenizer: {exc}") from None
    tokenizer_json = _read_json(model_dir / "tokenizer.json")
    vocab = _build_vocab(model_dir, tokenizer_json, tokenizer, hp["n_vocab"])

    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    with staged_file(out_file, "gguf", **target_rules) as staging:
        _write_gguf(gguf, staging, hp, tensors, vocab, tokenizer, tokenizer_json, model_dir, ftype, log)
    if log:
        log(f"gguf {outtype}: {model_dir} -> {out_file} ({out_file.stat().st_size / 2**20:.1f} MiB)")
    return out_file


def _write_gguf(gguf, staging: Path, hp, tensors, vocab, tokenizer, tokenizer_json, model_dir: Path, ftype, log):
    from safetensors import safe_open

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI3]
    writer = gguf.GGUFWriter(str(staging), arch)
    try:
        # general.*
        merge_info = model_dir / "codetune_merge.json"
        writer.add_type(gguf.GGUFType.MODEL)
        name = _merge_name(merge_info, model_dir) if merge_info.is_file() else model_dir.name
        writer.add_name(_general_name(name, tokenizer_json))
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        # phi3.*: what llama.cpp's convert_hf_to_gguf.py writes for Phi3ForCausalLM
        writer.add_context_length(hp["n_ctx"])
        writer.add_rope_scaling_orig_ctx_len(hp["n_ctx_orig"])
        writer.add_embedding_length(hp["n_embd"])
        writer.add_feed_forward_length(hp["n_ff"])
        writer.add_block_count(hp["n_layer"])
        writer.add_head_count(hp["n_head"])
        writer.add_head_count_kv(hp["n_head_kv"])
        writer.add_layer_norm_rms_eps(hp["rms_eps"])
        writer.add_rope_dimension_count(hp["n_rot"])
        writer.add_rope_freq_base(hp["rope_theta"])
        writer.add_sliding_window(hp["sliding_window"])
        if hp["rope_scaling"]:
            scale = hp["n_ctx"] / hp["n_ctx_orig"]
            attn = math.sqrt(1 + math.log(scale) / math.log(hp["n_ctx_orig"])) if scale > 1.0 else 1.0
            writer.add_rope_scaling_attn_factors(float(hp["rope_scaling"].get("attention_factor") or attn))

        # tokenizer.ggml.*
        writer.add_tokenizer_model(vocab.model)
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        if vocab.scores is not None:
            writer.add_token_scores(vocab.scores)
        writer.add_token_types(vocab.types)
        special = gguf.SpecialVocab(model_dir, load_merges=vocab.merges, n_vocab=len(vocab.tokens))
        if vocab.merges and not special.merges:
            raise GGUFExportError(f"{model_dir}/tokenizer.json has no BPE merges")
        # The ids and the add-bos/eos behaviour of the tokenizer transformers actually loads.
        special.special_token_ids = {
            typ: tid
            for typ, tid in (
                ("bos", tokenizer.bos_token_id),
                ("eos", tokenizer.eos_token_id),
                ("unk", tokenizer.unk_token_id),
                ("pad", tokenizer.pad_token_id),
                ("eot", _token_id(tokenizer, "<|end|>")),
            )
            if tid is not None
        }
        special.add_special_token = {
            "bos": _adds_special(tokenizer, tokenizer.bos_token_id, first=True),
            "eos": _adds_special(tokenizer, tokenizer.eos_token_id, first=False),
        }
        if tokenizer.chat_template:
            special.chat_template = tokenizer.chat_template
        if vocab.model == "llama":
            writer.add_add_space_prefix(_spm_adds_prefix(tokenizer_json))
        special.add_to_gguf(writer, quiet=True)

        # tensors: infos first, then the data one tensor at a time (a 3.8B model never sits in memory)
        for t in tensors:
            nbytes, shape, dtype = _nbytes_and_shape(t)
            raw = None if dtype.kind == "f" else t.qtype
            writer.add_tensor_info(t.name, shape, dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with contextlib.ExitStack() as stack:
            files = sorted({t.file for t in tensors if t.file is not None})
            handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
            for i, t in enumerate(tensors):
                writer.write_tensor_data(_load(t, handles))
                if log and (i % 50 == 0 or i == len(tensors) - 1):
                    log(f"  [{i + 1}/{len(tensors)}] {t.name} {t.qtype.name} {list(t.shape)}")
        writer.close()
    except BaseException:
        writer.close()
        raise


def _token_id(tokenizer, text: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(text)
    if tid is None or tid == tokenizer.unk_token_id:
        return None
    return tid


def _spm_adds_prefix(tj: dict) -> bool:
    """llama.cpp's add_space_prefix for a SentencePiece-style tokenizer.json.

    llama.cpp puts "▁" before the text *and after every special token*. The legacy Llama
    tokenizer.json (a ``Prepend`` normalizer, or ``Metaspace`` with ``prepend_scheme: always``) does
    the same. transformers 5 rewrites Phi-3's as ``Metaspace`` with ``prepend_scheme: first``: "▁"
    before the first piece of text only, so never inside a chat prompt, which starts with a special
    token. llama.cpp cannot express "first"; without the prefix its tokens match transformers on
    every chat prompt, and differ only on a raw prompt's first word.
    """
    for part in (tj.get("normalizer"), tj.get("pre_tokenizer")):
        for item in (part or {}).get("normalizers") or (part or {}).get("pretokenizers") or [part or {}]:
            if item.get("type") == "Prepend":
                return True
            if item.get("type") == "Metaspace":
                return (
                    item.get("prepend_scheme", "always" if item.get("add_prefix_space", True) else "never") == "always"
                )
    return False


_PHI3_NAME = re.compile(r"(phi)-?(3)", re.IGNORECASE)


def _general_name(name: str, tj: dict) -> str:
    """general.name, adjusted so that llama.cpp strips whitespace after special tokens exactly when
    the tokenizer does.

    llama.cpp's vocabulary loader sets "rstrip" on every special token except <unk>, <s> and
    <|endoftext|> when general.name contains "phi3" or "phi-3" (Phi-3's tokenizer.json has rstrip on
    <|user|>, <|end|>, ...; the newline after them vanishes). The tiny model's tokenizer has no
    rstrip, so its name must not say phi3; a Phi-3 fine-tune's name must.
    """
    unstripped = {"<unk>", "<s>", "<|endoftext|>"}
    flags = [bool(a.get("rstrip")) for a in tj.get("added_tokens", []) if a.get("content") not in unstripped]
    phi3_rstrip = bool(flags) and sum(flags) * 2 > len(flags)
    if phi3_rstrip and not _PHI3_NAME.search(name):
        return f"{name} (phi-3)"
    if not phi3_rstrip:
        return _PHI3_NAME.sub(r"\1 \2", name)
    return name


def _merge_name(merge_info: Path, model_dir: Path) -> str:
    try:
        info = json.loads(merge_info.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return model_dir.name
    return str(info.get("recipe") or model_dir.name)
