"""``codetune export``: a merged model folder as one GGUF file for llama.cpp and Ollama.

The file is written with the ``gguf`` package (gguf-py, published by the llama.cpp project): its
``GGUFWriter`` writes the format, its ``TensorNameMap`` names the tensors, its ``SpecialVocab``
reads the merges and the chat template, its ``quants`` module makes bf16 and q8_0. What codetune
adds is what llama.cpp's ``convert_hf_to_gguf.py`` adds for each supported architecture: the
hyperparameters and a vocabulary in the form llama.cpp expects. We do not run that script because
it cannot read what we write: it wants a SentencePiece ``tokenizer.model`` for Phi-3, which
``save_pretrained`` in transformers 5 no longer writes, and it rejects any byte-level BPE
pre-tokenizer it does not know by hash (the tiny models').

Each model family that GGUF export supports describes its llama.cpp architecture in its own file
(``families/<name>.py``) as a :class:`GGUFPlan`: the architecture name, every tensor of a block with
its shape, whether q and k are permuted for llama.cpp's rope, the end-of-turn token, the rope
scalings it handles and any metadata or generated tensors of its own. This module does the rest, in
named steps: read the folder and its hyperparameters (:func:`read_model`, :func:`read_hparams`),
plan the tensors (:func:`plan_tensors`), read the vocabulary (:func:`read_vocab`), write the
metadata and the tensors (:func:`write_metadata`, :func:`write_tensors`), and read the file back
(:func:`verify`).

Tokenizers supported:

* SentencePiece-style (``tokenizer.json`` BPE with byte fallback: Phi-3, Llama 2) -> ``llama``.
  Scores come from ``tokenizer.model`` when the folder has one, else from the merge ranks of
  ``tokenizer.json`` (llama.cpp's SPM tokenizer merges the highest score first, HF the lowest rank).
* Byte-level BPE -> ``gpt2``, with llama.cpp's pre-tokenizer named from the split regex:
  GPT-2's (``ByteLevel`` with its regex: the tiny models) -> ``gpt-2``, Qwen2's -> ``qwen2``,
  Llama 3's -> ``llama-bpe``.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import GGUFExportError
from .families._gguf import GGUFPlan, Shapes, Tensor, gguf_package
from .rundir import ADAPTER_CONFIG, MERGE_RECORD, check_target, is_gguf_file, staged_file

OUTTYPES = ("f16", "bf16", "f32", "q8_0")  # the first is the default


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GGUFExportError(f"{path} is not valid JSON: {exc}") from None


# ---------------------------------------------------------------------------------------
# Step 1: the folder, its family and its hyperparameters


def _family_and_plan(config: dict):
    """The config's model family and its GGUF plan; a config that names a supported architecture
    without a known model_type gets that architecture's family."""
    from .families import families, family_for

    family = family_for(config)
    if family.gguf_plan is None:
        archs = set(config.get("architectures") or [])
        for candidate in families().values():
            if candidate.gguf_plan is not None and archs & set(candidate.gguf_plan.architectures):
                return candidate, candidate.gguf_plan
    return family, family.gguf_plan


def read_model(model_dir: Path) -> tuple[dict, GGUFPlan]:
    """config.json of a merged, unquantized model folder with safetensors and tokenizer.json, and the
    GGUF plan of its family; anything else is a GGUFExportError that says what to do."""
    if not model_dir.is_dir():
        raise GGUFExportError(f"{model_dir} is not a directory: give a merged model folder (`codetune merge`)")
    if not (model_dir / "config.json").is_file():
        raise GGUFExportError(
            f"{model_dir} has no config.json: it is not a Hugging Face model folder. "
            "A run directory must be merged first (`codetune merge RUN_DIR`)"
        )
    if (model_dir / ADAPTER_CONFIG).is_file():
        raise GGUFExportError(f"{model_dir} is a LoRA adapter, not a model: merge it first (`codetune merge RUN_DIR`)")
    from .families import GENERIC, gguf_families

    config = _read_json(model_dir / "config.json")
    family, plan = _family_and_plan(config)
    if plan is None:
        archs = ", ".join(config.get("architectures") or []) or "an unknown architecture"
        kind = f"model_type {config.get('model_type')!r}" if family is GENERIC else f"model family {family.name}"
        raise GGUFExportError(
            f"{model_dir}: this folder holds {archs} ({kind}); GGUF export supports the families: "
            f"{', '.join(gguf_families())}"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise GGUFExportError(
            f"{model_dir}: hidden_act {config['hidden_act']!r} is not silu, which llama.cpp's {plan.arch} uses"
        )
    if config.get("quantization_config"):
        raise GGUFExportError(
            f"{model_dir} holds quantized weights ({config['quantization_config'].get('quant_method', '?')}): "
            "export an unquantized merge (`codetune merge` writes bf16)"
        )
    if not (model_dir / "tokenizer.json").is_file():
        raise GGUFExportError(f"{model_dir} has no tokenizer.json: the GGUF file needs the tokenizer")
    return config, plan


def _rope(config: dict) -> tuple[float, float, dict | None]:
    """(rope_theta, partial_rotary_factor, scaling or None) from a transformers 4 or 5 config."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or None
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if scaling is None:
        scaling = params
    if str(scaling.get("rope_type") or scaling.get("type") or "default").lower() == "default":
        scaling = None  # transformers 5 writes {"rope_type": "default", "rope_theta": ...} for plain rope
    return float(theta), float(partial), scaling


def rope_type(hp: dict) -> str:
    """The rope scaling's kind ("default" when there is none)."""
    scaling = hp["rope_scaling"] or {}
    return str(scaling.get("rope_type") or scaling.get("type") or "default").lower()


def read_hparams(config: dict, plan: GGUFPlan) -> dict:
    """The hyperparameters llama.cpp's loader reads, from config.json."""
    try:
        n_embd = int(config["hidden_size"])
        n_head = int(config["num_attention_heads"])
        hp = dict(
            n_embd=n_embd,
            n_ff=int(config["intermediate_size"]),
            n_layer=int(config["num_hidden_layers"]),
            n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            head_dim=int(config.get("head_dim") or n_embd // n_head),
            explicit_head_dim="head_dim" in config and config["head_dim"] is not None,
            n_ctx=int(config["max_position_embeddings"]),
            n_ctx_orig=int(config.get("original_max_position_embeddings") or config["max_position_embeddings"]),
            rms_eps=float(config["rms_norm_eps"]),
            n_vocab=int(config["vocab_size"]),
            sliding_window=int(config.get("sliding_window") or 0),
            tied=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        key = exc.args[0] if isinstance(exc, KeyError) else exc
        raise GGUFExportError(
            f"config.json lacks {key!r} or has a wrong value for it, which a {plan.arch} config has right"
        ) from None
    hp["rope_theta"], partial, hp["rope_scaling"] = _rope(config)
    hp["n_rot"] = int(partial * hp["head_dim"])
    kind = rope_type(hp)
    if kind != "default" and kind not in plan.rope_types:
        supported = ", ".join(("default", *plan.rope_types))
        raise GGUFExportError(
            f"config.json: rope scaling {kind!r} is not supported for llama.cpp's {plan.arch} (supported: {supported})"
        )
    return hp


# ---------------------------------------------------------------------------------------
# Step 2: the tensor plan


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


def expected_shapes(hp: dict, plan: GGUFPlan) -> Shapes:
    """Every checkpoint tensor the file holds, by GGUF name, with its (out, in) shape."""
    shapes: Shapes = {"token_embd.weight": (hp["n_vocab"], hp["n_embd"]), "output_norm.weight": (hp["n_embd"],)}
    if not hp["tied"]:
        shapes["output.weight"] = (hp["n_vocab"], hp["n_embd"])
    for i in range(hp["n_layer"]):
        shapes.update({f"blk.{i}.{name}": shape for name, shape in plan.block(hp).items()})
    return shapes


def _qtype(gguf, name: str, shape: tuple[int, ...], wanted):
    # Norms, biases and other 1-D tensors stay f32, as llama.cpp's converter keeps them.
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if wanted == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
        return gguf.GGMLQuantizationType.F16  # q8_0 blocks are 32 wide; the converter falls back too
    return wanted


def plan_tensors(model_dir: Path, hp: dict, plan: GGUFPlan, outtype: str) -> list[Tensor]:
    """Every tensor of the GGUF file: its GGUF name, source, shape and ggml type, in llama.cpp's order.

    Each checkpoint tensor must be one the architecture has, with the shape config.json implies, and
    none may be missing; a tied model's lm_head (when saved at all) is left out: llama.cpp reuses
    token_embd.
    """
    expect = expected_shapes(hp, plan)
    tensors = _checkpoint_tensors(model_dir, hp, plan, outtype)
    _check_tensors(tensors, expect, model_dir, plan)
    tensors.sort(key=_converter_order)
    extra = plan.extra_tensors(model_dir, hp) if plan.extra_tensors else []
    return extra + tensors


def _checkpoint_tensors(model_dir: Path, hp: dict, plan: GGUFPlan, outtype: str) -> list[Tensor]:
    """The checkpoint's tensors under their GGUF names (in file order), without checking them against the plan."""
    gguf = gguf_package()
    from safetensors import safe_open

    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[plan.arch]
    name_map = gguf.get_tensor_name_map(arch, hp["n_layer"])
    wanted = gguf.GGMLQuantizationType[outtype.upper()]
    tensors: list[Tensor] = []
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
                name = found[1] if found else ""
                if name == "output.weight" and hp["tied"]:
                    continue  # tied: the head is the embedding
                shape = tuple(f.get_slice(hf_name).get_shape())
                heads = 0
                if plan.permute_qk and re.search(r"\.attn_[qk]\.", name):
                    heads = hp["n_head"] if ".attn_q." in name else hp["n_head_kv"]
                qtype = _qtype(gguf, name, shape, wanted)
                tensors.append(Tensor(hf_name, name, file, shape, qtype, permute_heads=heads))
    return tensors


def _check_tensors(tensors: list[Tensor], expect: Shapes, model_dir: Path, plan: GGUFPlan) -> None:
    """Every checkpoint tensor has a place and the shape config.json implies, once, and none is missing."""
    # A tensor the architecture does not have says more about the folder than a wrong shape does.
    for t in tensors:
        if t.name not in expect:
            raise GGUFExportError(f"{t.file}: tensor {t.hf_name!r} has no place in llama.cpp's {plan.arch} model")
    for t in tensors:
        if t.shape != expect[t.name]:
            raise GGUFExportError(
                f"{model_dir}: {t.hf_name} has shape {list(t.shape)}, config.json implies {list(expect[t.name])}"
            )
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise GGUFExportError(f"{model_dir}: two checkpoint tensors map to the same GGUF tensor")
    missing = sorted(set(expect) - set(names))
    if missing:
        raise GGUFExportError(
            f"{model_dir}: the checkpoint lacks {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} "
            f"(GGUF names), which llama.cpp's {plan.arch} needs"
        )


def _converter_order(t: Tensor):
    """The converter's order: embeddings, block by block, then the output norm and head."""
    if t.name.startswith("blk."):
        return (1, int(t.name.split(".")[1]), t.name)
    return (0 if t.name.startswith("token_embd") else 2, 0, t.name)


def _nbytes_and_shape(t: Tensor):
    """(byte count, shape for add_tensor_info, numpy dtype) of a tensor once converted to t.qtype."""
    import numpy as np

    gguf = gguf_package()
    Q = gguf.GGMLQuantizationType
    n = math.prod(t.shape)
    if t.qtype == Q.F32:
        return 4 * n, t.shape, np.dtype(np.float32)
    if t.qtype == Q.F16:
        return 2 * n, t.shape, np.dtype(np.float16)
    byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
    return math.prod(byte_shape), byte_shape, np.dtype(np.uint8)


def _interleave_halves(data, heads: int):
    """Rows of q or k from transformers' rotate-half order (per head: the first halves of the rotated
    pairs, then the second halves) to llama.cpp's "llama" order (per head: the pairs side by side)."""
    rows = data.shape[0]
    half = rows // heads // 2
    return data.reshape(heads, 2, half, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _load(t: Tensor, handles: dict):
    """The tensor's data, converted to t.qtype, as the numpy array GGUFWriter writes."""
    import numpy as np
    import torch

    gguf = gguf_package()
    if t.file is None:
        data = np.asarray(t.values, dtype=np.float32)
    else:
        data = handles[t.file].get_tensor(t.hf_name).to(torch.float32).numpy()
    if t.permute_heads:
        data = _interleave_halves(data, t.permute_heads)
    Q = gguf.GGMLQuantizationType
    if t.qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if t.qtype == Q.F16:
        return np.ascontiguousarray(data.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(data), t.qtype)


# ---------------------------------------------------------------------------------------
# Step 3: the vocabulary

# llama.cpp names each byte-level BPE pre-tokenizer it implements; these are the split regexes of
# the tokenizer.json files they stand for (llama.cpp's llama-vocab.cpp quotes them).
# They differ only in how many digits make one piece: Qwen2 one, Llama 3 up to three.
_SPLIT_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_SPLIT_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_REGEX_PRE = {
    _SPLIT_HEAD + r"\p{N}" + _SPLIT_TAIL: "qwen2",
    _SPLIT_HEAD + r"\p{N}{1,3}" + _SPLIT_TAIL: "llama-bpe",
}
# llama.cpp uses a whole word found in the vocabulary without merging for these pre-tokenizers only;
# the tokenizer.json must say the same (its model.ignore_merges), or the two tokenize differently.
_IGNORES_MERGES = {"llama-bpe"}


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: bool  # whether tokenizer.ggml.merges is needed
    tokenizer: Any = None  # the transformers tokenizer it was read with
    tokenizer_json: dict | None = None



def _byte_level_pre(tj: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json; None if it is not one."""
    pre = tj.get("pre_tokenizer") or {}
    if (tj.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(parts) == 2:
        split, byte_level = parts
        if (
            split.get("type") == "Split"
            and split.get("behavior") == "Isolated"
            and not split.get("invert", False)
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space", False)
        ):
            return _SPLIT_REGEX_PRE.get((split.get("pattern") or {}).get("Regex"))
    return None


def _tokenizer_kind(tj: dict, model_dir: Path) -> tuple[str, str]:
    """(tokenizer.ggml.model, tokenizer.ggml.pre) for a tokenizer.json."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(
            f"{model_dir}/tokenizer.json: a {model.get('type')!r} tokenizer is not supported (BPE only)"
        )
    if model.get("byte_fallback"):
        return "llama", "default"
    pre = _byte_level_pre(tj)
    if pre is None:
        raise GGUFExportError(
            f"{model_dir}/tokenizer.json: unsupported pre-tokenizer {json.dumps(tj.get('pre_tokenizer'))[:200]}. "
            "GGUF export supports SentencePiece-style BPE (Phi-3) and byte-level BPE whose split llama.cpp "
            "implements: GPT-2's (ByteLevel with its regex, add_prefix_space=false), Qwen2's and Llama 3's"
        )
    if bool(model.get("ignore_merges", False)) != (pre in _IGNORES_MERGES):
        raise GGUFExportError(
            f"{model_dir}/tokenizer.json: model.ignore_merges is {bool(model.get('ignore_merges', False))}, "
            f"but llama.cpp's {pre!r} pre-tokenizer implies {pre in _IGNORES_MERGES}: "
            "the two would tokenize differently"
        )
    return "gpt2", pre


def read_vocab(model_dir: Path, hp: dict) -> Vocab:
    """The tokenizer as llama.cpp's vocabulary, one entry per embedding row."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise GGUFExportError(f"{model_dir}: cannot load its tokenizer: {exc}") from None
    # What transformers runs, which is not always what tokenizer.json says: transformers 5 loads a qwen2
    # folder's tokenizer as Qwen2Tokenizer, which puts Qwen2's split regex in place of the file's.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tj = json.loads(backend.to_str()) if backend is not None else _read_json(model_dir / "tokenizer.json")
    vocab = _build_vocab(model_dir, tj, tokenizer, hp["n_vocab"])
    vocab.tokenizer, vocab.tokenizer_json = tokenizer, tj
    return vocab


def _build_vocab(model_dir: Path, tj: dict, tokenizer, n_vocab: int) -> Vocab:
    gguf = gguf_package()
    T = gguf.TokenType
    ggml_model, pre = _tokenizer_kind(tj, model_dir)
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
        elif ggml_model == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)

    if ggml_model == "gpt2":
        return Vocab("gpt2", pre, tokens, types, None, merges=True)

    # SentencePiece (llama.cpp's "llama" vocabulary): scores decide the merge order.
    scores = _spm_scores(model_dir, model, tokens, types)
    return Vocab("llama", pre, tokens, types, scores, merges=False)


def _spm_scores(model_dir: Path, model: dict, tokens: list[str], types: list[int]) -> list[float]:
    gguf = gguf_package()
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
# Steps 4-6: write the metadata and the tensors, read the file back

_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def export_gguf(model_dir: Path, out_file: Path, *, outtype: str = "f16", log=None, overwrite: bool = False) -> Path:
    """Write the merged model folder ``model_dir`` (phi3, qwen2 or llama family) as the GGUF file ``out_file``.

    ``outtype``: ``f32``, ``f16`` (default), ``bf16`` or ``q8_0``; norms and other 1-D tensors are
    always f32. The file is written in a fresh staging folder beside ``out_file``, read back, and
    renamed into place at the end; an existing ``out_file`` is replaced only with ``overwrite`` and
    only if it is GGUF.
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    target_rules = dict(overwrite=overwrite, protect=[model_dir], ours=is_gguf_file, what="GGUF output")
    check_target(out_file, "gguf", **target_rules)
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    config, plan = read_model(model_dir)
    hp = read_hparams(config, plan)
    tensors = plan_tensors(model_dir, hp, plan, outtype)
    vocab = read_vocab(model_dir, hp)

    gguf = gguf_package()
    with staged_file(out_file, "gguf", **target_rules) as staging:
        writer = gguf.GGUFWriter(str(staging), plan.arch)
        try:
            write_metadata(writer, model_dir, plan, hp, vocab, outtype)
            write_tensors(writer, tensors, log)
        finally:
            writer.close()
        verify(staging, plan, hp, tensors, vocab)
    if log:
        log(f"gguf {outtype}: {model_dir} -> {out_file} ({out_file.stat().st_size / 2**20:.1f} MiB)")
    return out_file


def write_metadata(writer, model_dir: Path, plan: GGUFPlan, hp: dict, vocab: Vocab, outtype: str) -> None:
    """general.*, the architecture's keys (what llama.cpp's converter writes for it) and tokenizer.ggml.*."""
    gguf = gguf_package()
    # general.*
    merge_info = model_dir / MERGE_RECORD
    writer.add_type(gguf.GGUFType.MODEL)
    name = _merge_name(merge_info, model_dir) if merge_info.is_file() else model_dir.name
    writer.add_name(_general_name(name, vocab.tokenizer_json))
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[outtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # <arch>.*: the keys every supported architecture has, then the plan's own
    writer.add_context_length(hp["n_ctx"])
    writer.add_embedding_length(hp["n_embd"])
    writer.add_feed_forward_length(hp["n_ff"])
    writer.add_block_count(hp["n_layer"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_layer_norm_rms_eps(hp["rms_eps"])
    writer.add_rope_dimension_count(hp["n_rot"])
    writer.add_rope_freq_base(hp["rope_theta"])
    if hp["explicit_head_dim"]:  # llama.cpp assumes n_embd / n_head unless told
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    if plan.metadata:
        plan.metadata(writer, hp)

    # tokenizer.ggml.*
    tokenizer = vocab.tokenizer
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
            ("eot", _token_id(tokenizer, plan.eot_token) if plan.eot_token else None),
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
        writer.add_add_space_prefix(_spm_adds_prefix(vocab.tokenizer_json))
    special.add_to_gguf(writer, quiet=True)


def write_tensors(writer, tensors: list[Tensor], log=None) -> None:
    """The tensor infos, then the data one tensor at a time (a 3.8B model never sits in memory)."""
    from safetensors import safe_open

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


def verify(path: Path, plan: GGUFPlan, hp: dict, tensors: list[Tensor], vocab: Vocab) -> None:
    """Read the written file back: the architecture, block count, vocabulary size, every tensor's name,
    type and shape must be what was planned, and the data must reach the end of the last tensor (a file
    llama.cpp would refuse never lands).

    gguf-py's GGUFReader builds a numpy view per array element, which takes minutes for a 150k-token
    vocabulary with its merges; :func:`_read_layout` walks the same layout with ``struct`` instead
    (the tests check both agree).
    """
    try:
        fields, infos, data_end = _read_layout(path, keys={"general.architecture", f"{plan.arch}.block_count"})
    except (ValueError, struct.error, OSError) as exc:
        raise GGUFExportError(f"the written GGUF file does not read back: {exc}") from None
    problems = []
    if fields.get("general.architecture") != plan.arch:
        problems.append(f"general.architecture is {fields.get('general.architecture')!r}, not {plan.arch!r}")
    if fields.get(f"{plan.arch}.block_count") != hp["n_layer"]:
        problems.append(f"{plan.arch}.block_count is {fields.get(f'{plan.arch}.block_count')}, not {hp['n_layer']}")
    if fields.get("tokenizer.ggml.tokens") != len(vocab.tokens):
        problems.append(f"{fields.get('tokenizer.ggml.tokens')} tokens, not {len(vocab.tokens)}")
    want = {t.name: (int(t.qtype), t.shape) for t in tensors}
    got = {name: (qtype, shape) for name, (qtype, shape, _) in infos.items()}
    if got != want:
        wrong = sorted(set(got) ^ set(want)) or sorted(n for n in want if got[n] != want[n])
        problems.append(f"tensors differ from the plan: {', '.join(wrong[:6])}")
    size = path.stat().st_size
    if size < data_end:
        problems.append(f"the file ends at byte {size}, before its last tensor's data ends ({data_end})")
    if problems:
        raise GGUFExportError(f"the written GGUF file is not what was planned: {'; '.join(problems)}")


def _read_layout(path: Path, keys: set[str]) -> tuple[dict, dict, int]:
    """(the scalar values of ``keys`` and the length of every array, {tensor: (ggml type, shape as
    (out, in), data offset)}, the byte where the last tensor's data ends) of a GGUF file."""
    gguf = gguf_package()
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cursor = _Cursor(buf, gguf.GGUFValueType)
        magic, version, n_tensors, n_kv = cursor.unpack("<IIQQ")
        if magic != gguf.GGUF_MAGIC or version != gguf.GGUF_VERSION:
            raise ValueError(f"magic {magic:#x}, version {version}")
        fields = _read_fields(cursor, n_kv, keys)
        infos = _read_tensor_infos(cursor, n_tensors)
        end = _data_end(gguf, cursor.pos, infos)
    return fields, infos, end


class _Cursor:
    """A read position in a GGUF file's bytes, moved past each value read or skipped."""

    def __init__(self, buf, value_types):
        V = self.V = value_types
        self.buf, self.pos = buf, 0
        self.sizes = {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4}
        self.sizes |= {V.FLOAT32: 4, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        text = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8")
        self.pos += n
        return text

    def skip(self, vtype) -> None:
        if vtype == self.V.STRING:
            (n,) = self.unpack("<Q")
            self.pos += n
        else:
            self.pos += self.sizes[vtype]

    def skip_array(self) -> int:
        """Move past an array value; its length."""
        item, count = self.unpack("<IQ")
        if item == self.V.STRING:
            for _ in range(count):
                self.skip(self.V.STRING)
        else:
            self.pos += self.sizes[self.V(item)] * count
        return count


def _read_fields(cursor: _Cursor, n_kv: int, keys: set[str]) -> dict:
    """The key-value section: the values of ``keys`` (strings and scalars) and every array's length."""
    V = cursor.V
    formats = {V.UINT32: "<I", V.INT32: "<i", V.UINT64: "<Q", V.FLOAT32: "<f", V.BOOL: "<?"}
    fields: dict = {}
    for _ in range(n_kv):
        key = cursor.string()
        (vtype,) = cursor.unpack("<I")
        if vtype == V.ARRAY:
            fields[key] = cursor.skip_array()
        elif key in keys and vtype == V.STRING:
            fields[key] = cursor.string()
        elif key in keys and vtype in formats:
            (fields[key],) = cursor.unpack(formats[V(vtype)])
        else:
            cursor.skip(V(vtype))
    return fields


def _read_tensor_infos(cursor: _Cursor, n_tensors: int) -> dict:
    """{tensor: (ggml type, shape as (out, in), data offset)}; GGUF lists dimensions innermost first."""
    infos: dict = {}
    for _ in range(n_tensors):
        name = cursor.string()
        (n_dims,) = cursor.unpack("<I")
        dims = cursor.unpack(f"<{n_dims}Q")
        qtype, offset = cursor.unpack("<IQ")
        infos[name] = (qtype, tuple(reversed(dims)), offset)
    return infos


def _data_end(gguf, infos_end: int, infos: dict) -> int:
    """The byte where the last tensor's data ends: the data starts at the first aligned byte after the infos."""
    data_start = infos_end + (-infos_end % gguf.GGUF_DEFAULT_ALIGNMENT)
    end = data_start
    for qtype, shape, offset in infos.values():
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        end = max(end, data_start + offset + math.prod(shape) // block * type_size)
    return end


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
