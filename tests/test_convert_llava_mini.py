"""LLaVA-Mini release checkpoint -> mmlm, against a PyTorch reference of compressor + pre-fusion.

The test writes a tiny checkpoint in the release layout (LLaMA tensors +
`model.mm_projector.*`, `model.compressor.*`, `model.prefusion_layers.*`
and the release config fields) and builds its own reference from
`torch.nn.MultiheadAttention`, `torch.nn.LayerNorm` and transformers'
`LlamaDecoderLayer` / `LlamaRotaryEmbedding`, following the release's
architecture: compressor q = LN_q(Q) + PE_q, k = LN_kv(X) + PE_k,
v = LN_kv(X) through one packed-projection multi-head attention; pre-fusion
LLaMA layers over [vision tokens, compressed tokens, text] with padding,
placeholders and response tokens masked out of the keys.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from convert_helpers import (assert_trees_equal, load_mmlm, randomize_, read_json, run_mmlm, tiny_clip,
                             tiny_llama_config)
from mmlm import IGNORE_INDEX, IMAGE_TOKEN_ID
from mmlm.models.llava_mini import LlavaMini

torch.set_grad_enabled(False)
C = 2  # compressor grid: 4 compressed tokens per image
PREFUSION = 2
DV = 32  # tiny CLIP width


# ----------------------------------------------------------------------- reference

def mae_sincos_2d(dim: int, grid: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed (as the release builds its query table), (grid*grid, dim)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w first
    g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1).astype(np.float32)


class Compressor(nn.Module):
    """The release Resampler: one cross-attention of C^2 learned queries over the patch features."""

    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.from_numpy(mae_sincos_2d(dim, grid)), requires_grad=False)
        self.query = nn.Parameter(0.02 * torch.randn(grid * grid, dim))
        self.attn = nn.MultiheadAttention(dim, 8, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=1e-5)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x):
        src, tgt = math.isqrt(self.pos_embed.shape[0]), math.isqrt(x.shape[1])
        pe_k = self.pos_embed
        if src != tgt:  # bicubic resize of the query table onto the key grid
            pe_k = F.interpolate(self.pos_embed.reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(tgt, tgt),
                                 mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)
        x = self.ln_kv(x)
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x + pe_k, x)[0]


class Release(nn.Module):
    """A tiny LLaVA-Mini in the release's module layout."""

    def __init__(self, seed: int):
        super().__init__()
        from transformers import LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        torch.manual_seed(seed)
        cfg = tiny_llama_config("llama31")
        self.llm = LlamaForCausalLM(cfg)
        d = cfg.hidden_size
        self.mm_projector = nn.Sequential(nn.Linear(DV, d), nn.GELU(), nn.Linear(d, d))
        self.compressor = Compressor(C, DV)
        self.prefusion_layers = nn.ModuleList([LlamaDecoderLayer(cfg, layer_idx=i) for i in range(PREFUSION)])
        self.rotary = LlamaRotaryEmbedding(cfg)
        pos = self.compressor.pos_embed.clone()
        randomize_(self, seed)
        self.compressor.pos_embed.copy_(pos)  # fixed table
        self.eval()

    def save(self, directory: str, hd_grid: int) -> None:
        state = dict(self.llm.state_dict())
        for name, module in (("mm_projector", self.mm_projector), ("compressor", self.compressor),
                             ("prefusion_layers", self.prefusion_layers)):
            state.update({f"model.{name}.{k}": v for k, v in module.state_dict().items()})
        state.pop("lm_head.weight") if self.llm.config.tie_word_embeddings else None
        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"),
                  metadata={"format": "pt"})
        config = self.llm.config.to_dict()
        config.update(model_type="llava_mini", architectures=["LlavaMiniLlamaForCausalLM"], compressor_size=C,
                      prefusion_layer_num=PREFUSION, mm_vision_tower="openai/clip-vit-large-patch14-336",
                      mm_projector_type="mlp2x_gelu", mm_hidden_size=DV, mm_vision_select_layer=-2,
                      mm_vision_select_feature="patch", image_aspect_ratio="pad")
        if hd_grid > 1:
            config["resolution_ratio"] = hd_grid
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f)

    def forward(self, feats, ids, labels, mask, hd_grid):
        """feats (B, K, N, Dv) -> (vision tokens (B, C^2, D), fused text (B, T, D), logits (B, L, V), valid)."""
        b, k, n, dv = feats.shape
        if hd_grid == 1:
            keys, views = feats[:, 0], [feats[:, 0]]
        else:  # stitch the n x n crops (raster order) into one grid, then the whole image
            g = math.isqrt(n)
            keys = feats[:, : hd_grid**2].reshape(b, hd_grid, hd_grid, g, g, dv).transpose(2, 3).reshape(b, -1, dv)
            views = [keys, feats[:, hd_grid**2]]
        text = self.llm.model.embed_tokens(ids.clamp(min=0))
        comp = self.mm_projector(self.compressor(keys))
        x = torch.cat([self.mm_projector(v) for v in views] + [comp, text], dim=1)
        p = x.shape[1] - ids.shape[1]
        fuse = mask & (ids != IMAGE_TOKEN_ID) & (labels == IGNORE_INDEX)  # instruction text only
        valid = torch.cat([torch.ones(b, p, dtype=torch.bool), fuse], dim=1)
        positions = torch.where(valid, valid.long().cumsum(-1) - 1, 0)
        s = x.shape[1]
        allowed = torch.tril(torch.ones(s, s, dtype=torch.bool)) & valid[:, None, :]
        attn_mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
        cos_sin = self.rotary(x, positions)
        for layer in self.prefusion_layers:
            x = layer(x, attention_mask=attn_mask, position_ids=positions, position_embeddings=cos_sin)
            x = x[0] if isinstance(x, tuple) else x
        tokens = x[:, p - C * C:p]
        fused = torch.where(fuse[..., None], x[:, p:], text)
        # LLM input: <image> replaced by the vision tokens, right padded.
        rows = []
        for i in range(b):
            seq_ids, seq = ids[i][mask[i]], fused[i][mask[i]]
            j = int((seq_ids == IMAGE_TOKEN_ID).nonzero()[0])
            rows.append(torch.cat([seq[:j], tokens[i], seq[j + 1:]]))
        length = ids.shape[1] - 1 + C * C
        embeds = torch.zeros(b, length, x.shape[-1])
        llm_valid = torch.zeros(b, length, dtype=torch.bool)
        for i, r in enumerate(rows):
            embeds[i, : len(r)], llm_valid[i, : len(r)] = r, True
        logits = self.llm(inputs_embeds=embeds, attention_mask=llm_valid.long(),
                          position_ids=torch.arange(length)[None].expand(b, -1)).logits
        return tokens, fused, logits, llm_valid


def make_batch(hd_grid: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, t = 2, 12
    ids = rng.integers(1, 128, (b, t))
    mask = np.ones((b, t), bool)
    mask[1, 9:] = False
    ids[1, 9:] = 0
    ids[0, 2] = ids[1, 1] = IMAGE_TOKEN_ID
    labels = np.full((b, t), IGNORE_INDEX)
    labels[0, 9:] = ids[0, 9:]  # responses: not fused
    labels[1, 7:9] = ids[1, 7:9]
    k = 1 if hd_grid == 1 else hd_grid**2 + 1
    images = rng.standard_normal((b, k, 32, 32, 3)).astype(np.float32)
    return ids, labels, mask, images


def build(tmp_path, hd_grid: int = 1):
    """(release module, CLIP model, release dir, CLIP dir)."""
    release_dir, clip_dir = str(tmp_path / "release"), str(tmp_path / "clip")
    vision = tiny_clip(clip_dir, "vision")
    release = Release(seed=5)
    release.save(release_dir, hd_grid)
    return release, vision, release_dir, clip_dir


def reference_outputs(release, vision, hd_grid: int):
    ids, labels, mask, images = make_batch(hd_grid)
    b, k = images.shape[:2]
    px = torch.from_numpy(images).reshape(b * k, 32, 32, 3).permute(0, 3, 1, 2)
    feats = vision(px, output_hidden_states=True).hidden_states[-2][:, 1:]
    feats = feats.reshape(b, k, *feats.shape[1:])
    tokens, fused, logits, valid = release(feats, torch.from_numpy(ids), torch.from_numpy(labels),
                                           torch.from_numpy(mask), hd_grid)
    return tokens.numpy(), fused.numpy(), logits.numpy(), valid.numpy()


def mmlm_outputs(directory: str, hd_grid: int):
    cfg, params = load_mmlm(directory)
    ids, labels, mask, images = make_batch(hd_grid)
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "fuse_mask": jnp.asarray(labels == IGNORE_INDEX),
             "attention_mask": jnp.asarray(mask), "images": jnp.asarray(images[:, None]),
             "frame_mask": jnp.ones((2, 1), bool)}
    model = LlavaMini(cfg)
    tokens, _, fused = jax.jit(lambda p, b: model.apply({"params": p}, b, C * C,
                                                        method=LlavaMini.vision_and_text))(params, batch)
    out = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
    return np.asarray(tokens), np.asarray(fused), np.asarray(out["logits"]), np.asarray(out["valid"])


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("hd_grid", [1, 2])
def test_llava_mini_matches_torch_reference(tmp_path, hd_grid):
    release, vision, release_dir, clip_dir = build(tmp_path, hd_grid)
    dst = str(tmp_path / "mmlm")
    code, out, err = run_mmlm("convert", "--from", "llava-mini", "--src", release_dir, "--vision", clip_dir,
                              "--dst", dst, "--quiet")
    assert code == 0, err
    cfg, params = load_mmlm(dst)
    assert set(params) == {"vision", "projector", "compressor", "prefusion", "llm"}
    assert cfg.compressor.tokens == C * C and cfg.prefusion_layers == PREFUSION and cfg.hd_grid == hd_grid
    ref_tokens, ref_fused, ref_logits, ref_valid = reference_outputs(release, vision, hd_grid)
    tokens, fused, logits, valid = mmlm_outputs(dst, hd_grid)
    np.testing.assert_array_equal(valid, ref_valid)
    assert np.abs(tokens - ref_tokens).max() <= 1e-4
    assert np.abs(fused - ref_fused).max() <= 1e-4
    assert np.abs(logits - ref_logits)[valid].max() <= 1e-4
    # `mmlm verify` (its own reference, from the checkpoint on disk) agrees with the converted model; once a
    # compressor weight of the source changes, it fails (one verify run per case keeps the test fast).
    if hd_grid == 1:
        path = os.path.join(release_dir, "model.safetensors")
        tensors = load_file(path)
        tensors["model.compressor.attn.out_proj.weight"] += 0.05
        save_file(tensors, path, metadata={"format": "pt"})
    code, out, err = run_mmlm("verify", "--hf", release_dir, "--mmlm", dst, "--vision", clip_dir, "--json")
    result = json.loads(out)
    assert set(result["outputs"]) == {"vision_tokens", "logits"} and "random images" in result["inputs"]
    if hd_grid == 1:
        assert code == 1 and not result["outputs"]["vision_tokens"]["ok"] and not result["ok"]
    else:
        assert code == 0 and result["ok"], out + err
        assert result["outputs"]["vision_tokens"]["max_abs_diff"] <= 1e-4


def test_release_round_trip_is_exact(tmp_path):
    _, _, release_dir, clip_dir = build(tmp_path)
    mm1, hf2, mm2 = (str(tmp_path / n) for n in ("mm1", "hf2", "mm2"))
    assert run_mmlm("convert", "--from", "llava-mini", "--src", release_dir, "--vision", clip_dir, "--dst", mm1,
                    "--quiet")[0] == 0
    code, out, err = run_mmlm("convert", "--to", "hf", "--src", mm1, "--dst", hf2, "--vision", clip_dir, "--quiet")
    assert code == 0, err
    original, exported = load_file(os.path.join(release_dir, "model.safetensors")), load_file(
        os.path.join(hf2, "model.safetensors"))
    assert set(original) == set(exported)
    for name, tensor in original.items():
        if name == "model.compressor.pos_embed":  # recomputed table: same up to float rounding
            torch.testing.assert_close(exported[name], tensor, atol=1e-6, rtol=0)
        else:
            assert torch.equal(exported[name], tensor), name
    config = read_json(os.path.join(hf2, "config.json"))
    assert config["compressor_size"] == C and config["mm_vision_tower"] == os.path.join(hf2, "vision_tower")
    # The exported tower sits next to it and is found on re-import without --vision.
    assert run_mmlm("convert", "--from", "llava-mini", "--src", hf2, "--dst", mm2, "--quiet")[0] == 0
    assert_trees_equal(load_mmlm(mm1)[1], load_mmlm(mm2)[1])


def test_release_without_vision_tower(tmp_path):
    """No --vision and no tower in the checkpoint: converts the rest, and verify compares from features."""
    _, _, release_dir, _ = build(tmp_path)
    dst = str(tmp_path / "mmlm")
    code, out, err = run_mmlm("convert", "--from", "llava-mini", "--src", release_dir, "--dst", dst, "--quiet")
    assert code == 0, err
    assert "no vision tower" in out
    assert "vision" not in load_mmlm(dst)[1]
    code, out, err = run_mmlm("verify", "--hf", release_dir, "--mmlm", dst, "--json")
    assert code == 0, out + err
    assert "random CLIP features" in json.loads(out)["inputs"]


def test_a_stored_position_table_that_differs_is_read_from_the_checkpoint(tmp_path):
    """As the authors' code does: a release whose table is not the sin-cos one (beyond rounding) keeps its own,
    for the queries and, bicubically resized, for the HD keys; the export writes it back unchanged."""
    release, vision, release_dir, clip_dir = build(tmp_path, hd_grid=2)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        release.compressor.pos_embed.add_(0.2 * torch.randn(release.compressor.pos_embed.shape, generator=gen))
    release.save(release_dir, 2)
    dst = str(tmp_path / "mmlm")
    code, out, err = run_mmlm("convert", "--from", "llava-mini", "--src", release_dir, "--vision", clip_dir,
                              "--dst", dst)
    assert code == 0, err
    assert "stored table is used" in out
    cfg, params = load_mmlm(dst)
    assert cfg.compressor.stored_position_table
    np.testing.assert_array_equal(params["compressor"]["pos_embed"], release.compressor.pos_embed.numpy())
    ref_tokens, ref_fused, ref_logits, ref_valid = reference_outputs(release, vision, 2)
    tokens, fused, logits, valid = mmlm_outputs(dst, 2)
    assert np.abs(tokens - ref_tokens).max() <= 1e-4
    assert np.abs(logits - ref_logits)[valid].max() <= 1e-4
    hf2 = str(tmp_path / "hf2")
    assert run_mmlm("convert", "--to", "hf", "--src", dst, "--dst", hf2, "--vision", clip_dir, "--quiet")[0] == 0
    exported = load_file(os.path.join(hf2, "model.safetensors"))["model.compressor.pos_embed"]
    assert torch.equal(exported, release.compressor.pos_embed)


def test_a_position_table_of_another_shape_is_rejected(tmp_path):
    _, _, release_dir, clip_dir = build(tmp_path)
    path = os.path.join(release_dir, "model.safetensors")
    tensors = load_file(path)
    tensors["model.compressor.pos_embed"] = torch.randn(3, tensors["model.compressor.pos_embed"].shape[1])
    save_file(tensors, path, metadata={"format": "pt"})
    code, _, err = run_mmlm("convert", "--from", "llava-mini", "--src", release_dir, "--vision", clip_dir,
                            "--dst", str(tmp_path / "out"))
    assert code == 2 and "model.compressor.pos_embed has shape (3," in err and "Traceback" not in err