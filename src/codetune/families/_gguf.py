"""What a family file needs to describe its llama.cpp architecture for GGUF export: the plan type
(:class:`GGUFPlan`), the tensor record (:class:`Tensor`) and the helpers that build them.

It lives in the families package, not in ``codetune.gguf_export``, so that the families import nothing
above them: ``gguf_export`` reads the families' plans, the families never import the exporter.
(A module whose name starts with ``_`` is a helper, not a family: family discovery skips it.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import GGUFExportError

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class GGUFPlan:
    """One llama.cpp architecture, as a model family describes it (``Family.gguf_plan``)."""

    arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES): "phi3", "qwen2", "llama"
    architectures: tuple[str, ...]  # the Hugging Face architectures it covers
    # hparams -> each tensor of one block: its GGUF name after "blk.N." and its checkpoint shape (out, in)
    block: Callable[[dict], Shapes]
    # llama.cpp's "llama" rotates interleaved pairs, transformers rotates halves: q and k rows are reordered
    permute_qk: bool = False
    eot_token: str | None = None  # the token that closes a turn (llama.cpp's end-of-turn id)
    rope_types: tuple[str, ...] = ()  # rope scalings handled besides "default"
    # (writer, hparams) -> the architecture's own keys, beyond those every architecture gets
    metadata: Callable[[Any, dict], None] | None = None
    # (model_dir, hparams) -> generated tensors (rope factors) that precede the checkpoint's
    extra_tensors: Callable[[Path, dict], list] | None = None


@dataclass(frozen=True)
class Tensor:
    """One tensor of the GGUF file: where its data comes from and how it is written."""

    hf_name: str
    name: str  # GGUF name
    file: Path | None  # safetensors file; None for a generated tensor (rope factors)
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    values: tuple[float, ...] | None = None  # the data of a generated tensor
    permute_heads: int = 0  # >0: rows reordered from rotate-half to interleaved pairs, per head


def gguf_package():
    """The ``gguf`` package (gguf-py), imported when first needed: importing a family must stay cheap."""
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a dependency
        raise GGUFExportError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


def separate_qkv_block(hp: dict, *, qkv_bias: bool = False, out_bias: bool = False, mlp_bias: bool = False) -> Shapes:
    """A block with separate q/k/v and gate/up projections (Llama, Qwen2), GQA included."""
    e, ff, hd = hp["n_embd"], hp["n_ff"], hp["head_dim"]
    q, kv = hp["n_head"] * hd, hp["n_head_kv"] * hd
    shapes: Shapes = {
        "attn_norm.weight": (e,),
        "attn_q.weight": (q, e),
        "attn_k.weight": (kv, e),
        "attn_v.weight": (kv, e),
        "attn_output.weight": (e, q),
        "ffn_norm.weight": (e,),
        "ffn_gate.weight": (ff, e),
        "ffn_up.weight": (ff, e),
        "ffn_down.weight": (e, ff),
    }
    if qkv_bias:
        shapes.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
    if out_bias:
        shapes["attn_output.bias"] = (e,)
    if mlp_bias:
        shapes.update({"ffn_gate.bias": (ff,), "ffn_up.bias": (ff,), "ffn_down.bias": (e,)})
    return shapes


def generated_tensor(hf_name: str, name: str, values) -> Tensor:
    """A 1-D f32 tensor the export computes (rope factors)."""
    values = tuple(float(v) for v in values)
    return Tensor(hf_name, name, None, (len(values),), gguf_package().GGMLQuantizationType.F32, values)


__all__ = ["GGUFPlan", "Shapes", "Tensor", "generated_tensor", "gguf_package", "separate_qkv_block"]
