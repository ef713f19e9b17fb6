"""Name maps between HF tensors and the mmlm parameter tree, used in both directions.

A name map is `{hf tensor name: Target}` enumerated from a model config (so
every layer index is explicit). Import reads each HF tensor, applies the
target's op and writes it into the mmlm leaf (a slice of it for scanned
layers); export applies the inverse op. One table serves both directions,
so an import followed by an export reproduces the HF names exactly.

Ops (torch layout -> mmlm layout):
* "copy": same array;
* "t": `Linear.weight` (out, in) -> Flax kernel (in, out);
* "conv": `Conv2d.weight` (out, in, kh, kw) -> Flax kernel (kh, kw, in, out).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Target:
    path: Path  # leaf path in the mmlm params tree, e.g. ("llm", "decoder", "layers", "q_proj", "kernel")
    op: str = "copy"  # "copy" | "t" | "conv"
    layer: int | None = None  # index on the leading (scanned) layer axis, None for unstacked leaves


def to_mmlm(array: np.ndarray, op: str) -> np.ndarray:
    """HF/torch layout -> mmlm layout (a view; callers copy into their buffer)."""
    if op == "copy":
        return array
    if op == "t":
        if array.ndim != 2:
            raise ValueError(f"expected a 2-D Linear weight, got shape {array.shape}")
        return array.T
    if op == "conv":
        if array.ndim != 4:
            raise ValueError(f"expected a 4-D Conv2d weight, got shape {array.shape}")
        return array.transpose(2, 3, 1, 0)
    raise ValueError(f"unknown op {op!r}")


def to_hf(array: np.ndarray, op: str) -> np.ndarray:
    """mmlm layout -> HF/torch layout (contiguous)."""
    if op == "copy":
        return np.ascontiguousarray(array)
    if op == "t":
        return np.ascontiguousarray(array.T)
    if op == "conv":
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    raise ValueError(f"unknown op {op!r}")


def hf_shape(mmlm_shape: tuple[int, ...], op: str) -> tuple[int, ...]:
    if op == "t":
        return tuple(reversed(mmlm_shape))
    if op == "conv":
        kh, kw, cin, cout = mmlm_shape
        return (cout, cin, kh, kw)
    return tuple(mmlm_shape)


# ----------------------------------------------------------------------------- LLaMA

# One decoder block: HF suffix -> (mmlm sub-path, op). Shared by the LLM and pre-fusion.
LLAMA_BLOCK: tuple[tuple[str, Path, str], ...] = (
    ("input_layernorm.weight", ("input_layernorm", "scale"), "copy"),
    ("self_attn.q_proj.weight", ("q_proj", "kernel"), "t"),
    ("self_attn.k_proj.weight", ("k_proj", "kernel"), "t"),
    ("self_attn.v_proj.weight", ("v_proj", "kernel"), "t"),
    ("self_attn.o_proj.weight", ("o_proj", "kernel"), "t"),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), "copy"),
    ("mlp.gate_proj.weight", ("gate_proj", "kernel"), "t"),
    ("mlp.up_proj.weight", ("up_proj", "kernel"), "t"),
    ("mlp.down_proj.weight", ("down_proj", "kernel"), "t"),
)


def llama_block_map(hf_prefix: str, mmlm_prefix: Path, num_layers: int) -> dict[str, Target]:
    """`{hf_prefix}{i}.<suffix>` for every layer i -> scanned leaves under `mmlm_prefix`."""
    out = {}
    for i in range(num_layers):
        for suffix, sub, op in LLAMA_BLOCK:
            out[f"{hf_prefix}{i}.{suffix}"] = Target(mmlm_prefix + sub, op, i)
    return out


def llama_map(num_layers: int, tie_embeddings: bool) -> dict[str, Target]:
    """`LlamaForCausalLM` -> params["llm"]."""
    out = {
        "model.embed_tokens.weight": Target(("llm", "embed_tokens", "embedding")),
        "model.norm.weight": Target(("llm", "norm", "scale")),
    }
    out.update(llama_block_map("model.layers.", ("llm", "decoder", "layers"), num_layers))
    if not tie_embeddings:
        out["lm_head.weight"] = Target(("llm", "lm_head", "kernel"), "t")
    return out


def llama_skip_reason(name: str, tie_embeddings: bool) -> str | None:
    """Why an HF LLaMA tensor has no mmlm counterpart (None = it should have one)."""
    if name.endswith("rotary_emb.inv_freq"):
        return "RoPE inverse-frequency buffer (recomputed from the config)"
    if name == "lm_head.weight" and tie_embeddings:
        return "lm_head tied to embed_tokens"
    return None


# ------------------------------------------------------------------------------ CLIP

def _clip_block() -> tuple[tuple[str, Path, str], ...]:
    out = []
    for hf, mm, linear in (("layer_norm1", "layer_norm1", False), ("self_attn.q_proj", "q_proj", True),
                           ("self_attn.k_proj", "k_proj", True), ("self_attn.v_proj", "v_proj", True),
                           ("self_attn.out_proj", "out_proj", True), ("layer_norm2", "layer_norm2", False),
                           ("mlp.fc1", "fc1", True), ("mlp.fc2", "fc2", True)):
        if linear:
            out += [(f"{hf}.weight", (mm, "kernel"), "t"), (f"{hf}.bias", (mm, "bias"), "copy")]
        else:  # LayerNorm
            out += [(f"{hf}.weight", (mm, "scale"), "copy"), (f"{hf}.bias", (mm, "bias"), "copy")]
    return tuple(out)


# One CLIP encoder block: HF suffix -> (mmlm sub-path, op).
CLIP_BLOCK = _clip_block()

# Prefixes under which CLIP vision weights are found, most specific first.
CLIP_PREFIXES = ("model.vision_tower.vision_tower.vision_model.", "vision_model.", "")
CLIP_PROBE = "embeddings.patch_embedding.weight"


def clip_prefix(names) -> str | None:
    """The prefix of the CLIP vision weights among `names`, or None if there are none."""
    names = set(names)
    for p in CLIP_PREFIXES:
        if p + CLIP_PROBE in names:
            return p
    return None


def clip_map(prefix: str, blocks_used: int) -> dict[str, Target]:
    """CLIP vision transformer (blocks [0, blocks_used)) -> params["vision"]."""
    out = {
        prefix + "embeddings.class_embedding": Target(("vision", "class_embedding")),
        prefix + "embeddings.patch_embedding.weight": Target(("vision", "patch_embedding", "kernel"), "conv"),
        prefix + "embeddings.position_embedding.weight": Target(("vision", "position_embedding")),
        prefix + "pre_layrnorm.weight": Target(("vision", "pre_layrnorm", "scale")),
        prefix + "pre_layrnorm.bias": Target(("vision", "pre_layrnorm", "bias")),
    }
    for i in range(blocks_used):
        for suffix, sub, op in CLIP_BLOCK:
            out[f"{prefix}encoder.layers.{i}.{suffix}"] = Target(("vision", "encoder", "layers") + sub, op, i)
    return out


CLIP_TEXT_TOWER = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


def clip_skip_reason(name: str, prefix: str, blocks_used: int) -> str | None:
    """Why a CLIP tensor is not imported (None = it should have been mapped)."""
    if prefix == "vision_model." and name.startswith(CLIP_TEXT_TOWER):
        return "CLIPModel text tower / projections (not used)"
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix):]
    if rest.startswith("post_layernorm."):
        return "CLIP post-LayerNorm (never reaches the selected hidden state)"
    if rest == "embeddings.position_ids":
        return "position-id buffer"
    if rest.startswith("encoder.layers."):
        layer = int(rest.split(".")[2])
        if layer >= blocks_used:
            return "CLIP blocks after the selected layer (never reach the features)"
    return None


# ------------------------------------------------------------------- LLaVA-Mini extras

def projector_map(depth: int) -> dict[str, Target]:
    """`model.mm_projector` (a Linear, or Sequential(Linear, GELU, Linear, ...)) -> params["projector"]."""
    out = {}
    for j in range(depth):
        hf = "model.mm_projector." if depth == 1 else f"model.mm_projector.{2 * j}."
        out[hf + "weight"] = Target(("projector", f"linear_{2 * j}", "kernel"), "t")
        out[hf + "bias"] = Target(("projector", f"linear_{2 * j}", "bias"))
    return out


COMPRESSOR_POS_EMBED = "model.compressor.pos_embed"


def compressor_map(stored_position_table: bool = False) -> dict[str, Target]:
    """The release `Resampler` -> params["compressor"].

    Its fixed `pos_embed` is recomputed by mmlm unless the model keeps the
    stored table (`model.compressor.stored_position_table`).
    """
    c = "model.compressor."
    stored = {COMPRESSOR_POS_EMBED: Target(("compressor", "pos_embed"))} if stored_position_table else {}
    return stored | {
        c + "query": Target(("compressor", "query")),
        c + "ln_q.weight": Target(("compressor", "ln_q", "scale")),
        c + "ln_q.bias": Target(("compressor", "ln_q", "bias")),
        c + "ln_kv.weight": Target(("compressor", "ln_kv", "scale")),
        c + "ln_kv.bias": Target(("compressor", "ln_kv", "bias")),
        c + "attn.in_proj_weight": Target(("compressor", "in_proj_kernel"), "t"),
        c + "attn.in_proj_bias": Target(("compressor", "in_proj_bias")),
        c + "attn.out_proj.weight": Target(("compressor", "out_proj", "kernel"), "t"),
        c + "attn.out_proj.bias": Target(("compressor", "out_proj", "bias")),
    }


def prefusion_map(num_layers: int) -> dict[str, Target]:
    return llama_block_map("model.prefusion_layers.", ("prefusion", "blocks", "layers"), num_layers)


# ---------------------------------------------------------------------- tree helpers

def flatten(tree: Any, prefix: Path = ()) -> dict[Path, Any]:
    """Nested dicts -> {path tuple: leaf}."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def unflatten(leaves: dict[Path, Any]) -> dict:
    out: dict = {}
    for path, value in leaves.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def path_str(path: Path) -> str:
    return "/".join(path)
