"""PyTorch reference of LLaVA-Mini (the authors' release architecture), built from a release checkpoint.

The release: CLIP features from the second-to-last block (class token
dropped) -> the compressor (learned queries; q = LN_q(Q) + PE_q,
k = LN_kv(X) + PE_k, v = LN_kv(X); one 8-head attention with packed biased
q/k/v projection) -> the 2-layer GELU projector; pre-fusion LLaMA decoder
layers over [all vision tokens, compressed tokens, instruction text]; the LLM
reads the fused text with each `<image>` replaced by the compressed tokens.

Used by `mmlm verify` as the "transformers side" for LLaVA-Mini: there is no
LLaVA-Mini class in transformers, so the model is assembled from the pieces
the release itself uses: `CLIPVisionModel`, the `Resampler` (two
`nn.LayerNorm`s and one `nn.MultiheadAttention`, with the checkpoint's own
stored query position table), the `mm_projector` Sequential, pre-fusion
`LlamaDecoderLayer`s with `LlamaRotaryEmbedding`, and `LlamaForCausalLM`.
Weights are read by name from the checkpoint (no mmlm name maps involved).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmlm import IGNORE_INDEX, IMAGE_TOKEN_ID
from mmlm.convert.io import CheckpointReader, numpy_to_torch


def load_weights(module: nn.Module, reader: CheckpointReader, prefix: str, dtype: torch.dtype) -> None:
    """Copies `prefix + <state_dict key>` from the checkpoint into every parameter/buffer of `module`."""
    state = module.state_dict()
    missing = [k for k in state if prefix + k not in reader]
    if missing:
        raise ValueError(f"checkpoint lacks {[prefix + k for k in missing][:8]}")
    with torch.no_grad():
        for k, v in state.items():
            v.copy_(numpy_to_torch(reader.get(prefix + k)).to(dtype))


def clip_tower(model: nn.Module) -> nn.Module:
    """The vision transformer of a `CLIPVisionModel` (transformers 4.x wraps it in `.vision_model`, 5.x not)."""
    return getattr(model, "vision_model", model)


class Resampler(nn.Module):
    """The release compressor: MHA(LN_q(Q) + PE, LN_kv(X) + resize(PE), LN_kv(X))."""

    def __init__(self, grid: int, dim: int, heads: int = 8):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, dim), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(grid * grid, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=1e-5)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-5)

    def key_pos(self, n: int) -> torch.Tensor:
        src, tgt = int(math.isqrt(self.pos_embed.shape[0])), int(math.isqrt(n))
        if src == tgt:
            return self.pos_embed
        grid = self.pos_embed.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
        out = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
        return out.permute(0, 2, 3, 1).flatten(0, 2).to(self.pos_embed.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, C^2, D)."""
        x = self.ln_kv(x)
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, x + self.key_pos(x.shape[1]).unsqueeze(0), x, need_weights=False)
        return out


def build_projector(kind: str, dv: int, d: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dv, d)
    depth = int(kind[len("mlp"):-len("x_gelu")])
    layers: list[nn.Module] = [nn.Linear(dv, d)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(d, d)]
    return nn.Sequential(*layers)


def additive_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) key validity -> (B, 1, S, S) causal additive mask for eager attention."""
    s = valid.shape[1]
    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool))[None] & valid[:, None, :]
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


class LlavaMiniReference(nn.Module):
    """LLaVA-Mini forward for single-image samples (HD when `hd_grid` > 1)."""

    def __init__(self, hf: dict[str, Any], llm: nn.Module, vision: nn.Module | None, select_layer: int,
                 vision_width: int):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        cfg = llm.config
        self.llm = llm
        self.vision = vision
        self.select_layer = select_layer
        self.hd_grid = int(hf.get("resolution_ratio") or 1)
        self.compressor = Resampler(int(hf["compressor_size"]), vision_width)
        self.mm_projector = build_projector(hf.get("mm_projector_type", "linear"), vision_width, cfg.hidden_size)
        n = int(hf.get("prefusion_layer_num", 4))
        self.prefusion_layers = nn.ModuleList([LlamaDecoderLayer(cfg, layer_idx=i) for i in range(n)])
        self.rotary = LlamaRotaryEmbedding(cfg)

    def load(self, reader: CheckpointReader, dtype: torch.dtype) -> None:
        load_weights(self.compressor, reader, "model.compressor.", dtype)
        load_weights(self.mm_projector, reader, "model.mm_projector.", dtype)
        load_weights(self.prefusion_layers, reader, "model.prefusion_layers.", dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K, 3, H, W) -> CLIP patch features (B, K, N, Dv) of the selected layer, class token dropped."""
        b, k = images.shape[:2]
        out = self.vision(images.flatten(0, 1), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer][:, 1:]
        return feats.reshape(b, k, *feats.shape[1:])

    def _views(self, feats: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Compressor keys and pre-fusion vision views (stitched HD crops + whole image)."""
        n = self.hd_grid
        if n == 1:
            return feats[:, 0], [feats[:, 0]]
        b, _, npatch, d = feats.shape
        g = int(math.isqrt(npatch))
        crops = feats[:, : n * n].reshape(b, n, n, g, g, d).transpose(2, 3).reshape(b, n * g * n * g, d)
        return crops, [crops, feats[:, n * n]]

    def vision_and_text(self, feats: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                        attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision tokens for the LLM (B, C^2, D) and the fused text embeddings (B, T, D)."""
        text = self.llm.get_input_embeddings()(ids.clamp(min=0))
        keys, views = self._views(feats)
        comp = self.mm_projector(self.compressor(keys))
        seq = torch.cat([self.mm_projector(v) for v in views] + [comp, text], dim=1)
        fuse = attention_mask.bool() & (ids != IMAGE_TOKEN_ID) & (labels == IGNORE_INDEX)
        p = seq.shape[1] - ids.shape[1]
        valid = torch.cat([torch.ones(ids.shape[0], p, dtype=torch.bool), fuse], dim=1)
        positions = torch.where(valid, valid.long().cumsum(-1) - 1, torch.ones_like(valid, dtype=torch.long))
        mask = additive_mask(valid, seq.dtype)
        pe = self.rotary(seq, positions)
        x = seq
        for layer in self.prefusion_layers:
            out = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=pe)
            x = out[0] if isinstance(out, tuple) else out
        tokens = x[:, p - comp.shape[1]: p]
        fused = torch.where(fuse[..., None], x[:, p:], text)
        return tokens, fused

    def logits(self, tokens: torch.Tensor, fused: torch.Tensor, ids: torch.Tensor,
               attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM logits over `[text before <image>, vision tokens, text after]`, right-padded: (B, L, V), valid (B, L)."""
        b, t = ids.shape
        m = tokens.shape[1]
        length = t - 1 + m
        embeds = torch.zeros(b, length, fused.shape[-1], dtype=fused.dtype)
        valid = torch.zeros(b, length, dtype=torch.bool)
        for i in range(b):
            keep = attention_mask[i].bool()
            seq_ids, seq_text = ids[i][keep], fused[i][keep]
            at = (seq_ids == IMAGE_TOKEN_ID).nonzero()
            if len(at):
                j = int(at[0])
                row = torch.cat([seq_text[:j], tokens[i], seq_text[j + 1:]])
            else:
                row = seq_text
            embeds[i, : len(row)] = row
            valid[i, : len(row)] = True
        positions = torch.arange(length)[None].expand(b, -1)
        logits = self.llm(inputs_embeds=embeds, attention_mask=valid.long(), position_ids=positions).logits
        return logits, valid


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
