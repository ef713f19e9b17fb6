"""LLaVA-Mini (and the LLaVA-1.5 baseline) assembled from the parts.

Batch (see `mmlm.data`): `input_ids`, `attention_mask`, `fuse_mask` (B, T);
`images` (B, F, K, H, W, 3) with F frames and K views per frame (1, or
n*n crops in raster order + the whole image for HD); `frame_mask` (B, F).
`images` are either float, already normalised (the host pipeline with
`data.pixels_on_device=False`, inference), or uint8 pixels, which the model
normalises with `model.image_mean` / `model.image_std` (`normalize_images`).
A sample has media iff its `input_ids` contain the placeholder
`model.image_token_id`; its vision tokens replace that placeholder.
`fuse_mask` marks the instruction tokens pre-fusion may read; it is built
from the conversation roles by the data pipeline and by the prompt batcher
alike. Labels are not a model input: the model returns, per LLM position,
the index of the text token there (`text_index`), and the loss gathers the
labels with it (`mmlm.models.loss.targets_from_labels`).

Per image/frame (llava_mini mode):
    feats  = ViT(view)                                   (N, Dv) per view
    comp   = compressor(feats or stitched HD crops, m)   (m, Dv)
    fused  = prefusion([proj(feats...), proj(comp), text])
    LLM gets fused[compressed positions] in place of `<image>`, and the fused
    text (averaged over frames for video).
llava15 mode: the LLM gets proj(feats) for all N patches of every frame.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange, repeat

from mmlm.models.compressor import make_compressor
from mmlm.models.config import ModelConfig
from mmlm.models.layers import positions_from_valid
from mmlm.models.llama import KVCache, LlamaModel
from mmlm.models.prefusion import PreFusion
from mmlm.models.projector import Projector
from mmlm.models.vit import VisionTower
from mmlm.pixels import normalization_constants

Batch = dict[str, jax.Array]


def normalize_images(images: jax.Array, frame_mask: jax.Array | None, mean, std, dtype) -> jax.Array:
    """uint8 pixels (B, F, K, H, W, 3) -> normalised `dtype` images; float images are returned as they are.

    (x / 255 - mean) / std computed in float32 as x * (1 / (255 std)) - mean / std, the host's formula
    (`mmlm.data.preprocess.normalize`), then frames whose `frame_mask` (B, F) is False are zeroed (the
    host's convention) and the result is cast to `dtype`. `frame_mask` None zeroes nothing.
    """
    if images.dtype != jnp.uint8:
        return images
    scale, offset = normalization_constants(mean, std)
    x = images.astype(jnp.float32) * jnp.asarray(scale) - jnp.asarray(offset)
    if frame_mask is not None:
        x = jnp.where(frame_mask[:, :, None, None, None, None], x, 0.0)
    return x.astype(dtype)


def stitch_crops(feats: jax.Array, n: int) -> jax.Array:
    """n*n crops' patch grids (B, n*n, g*g, D), raster order -> one (B, (n*g)^2, D) grid."""
    g = int(round(feats.shape[2] ** 0.5))
    return rearrange(feats, "b (r c) (i j) d -> b (r i c j) d", r=n, c=n, i=g, j=g)


def merge_vision_into_text(text: jax.Array, text_valid: jax.Array, has_media: jax.Array,
                           placeholder: jax.Array, vision: jax.Array, vision_valid: jax.Array,
                           align: str = "right") -> dict[str, jax.Array]:
    """Replaces each sample's placeholder by its V vision tokens, then packs tokens.

    text: (B, T, D); text_valid: (B, T); has_media, placeholder: (B,);
    vision: (B, V, D); vision_valid: (B, V). Output length L = T - 1 + V
    (T when V = 0). `align="right"` puts valid tokens first (training, right
    padding); `"left"` puts them last (batched prompts for generation).
    Returns embeds (B, L, D), valid, RoPE positions and `text_index` (B, L):
    the text position each slot holds, -1 for vision tokens and padding.
    """
    b, t, _ = text.shape
    v = vision.shape[1]
    length = t - 1 + v if v else t
    p = jnp.arange(length)[None, :]
    p0 = placeholder[:, None]
    in_vision = has_media[:, None] & (p >= p0) & (p < p0 + v)
    text_idx = jnp.where(has_media[:, None] & (p >= p0 + v), p - v + 1, p)
    text_ok = text_idx < t
    text_idx = jnp.clip(text_idx, 0, t - 1)
    vis_idx = jnp.clip(p - p0, 0, max(v - 1, 0))
    take = lambda a, idx: jnp.take_along_axis(a, idx if a.ndim == 2 else idx[..., None], axis=1)
    emb = take(text, text_idx)
    valid = take(text_valid, text_idx) & text_ok
    if v:
        emb = jnp.where(in_vision[..., None], take(vision, vis_idx).astype(emb.dtype), emb)
        valid = jnp.where(in_vision, take(vision_valid, vis_idx), valid)
    source = jnp.where(in_vision | ~valid, -1, text_idx)
    # Stable sort on validity packs real tokens together in their original order.
    key = (~valid) if align == "right" else valid
    order = jnp.argsort(key.astype(jnp.int32), axis=1, stable=True)
    emb, valid, source = take(emb, order), take(valid, order), take(source, order)
    return {"embeds": emb, "valid": valid, "positions": positions_from_valid(valid), "text_index": source}


class LlavaMini(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        stack = dict(scan_layers=cfg.scan_layers, scan_unroll=cfg.scan_unroll, remat=cfg.remat_policy,
                     attention=cfg.attention)
        init = dict(init_std=cfg.init_std)
        self.vision = VisionTower(cfg.vision, **stack, **kw, **init)
        self.projector = Projector(cfg.projector, cfg.llm.width, **kw, **init)
        if cfg.mode == "llava_mini":
            self.compressor = make_compressor(cfg.compressor, **kw, **init)
            if cfg.prefusion_layers:
                self.prefusion = PreFusion(cfg.llm, cfg.prefusion_layers, **stack, **kw, **init)
        self.llm = LlamaModel(cfg.llm, **stack, **kw, **init)

    # ------------------------------------------------------------------ vision
    def normalized_images(self, images: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """uint8 pixels -> normalised images in the compute dtype (zero where `frame_mask` is False); float
        images (already normalised) unchanged. (B, F, K, H, W, 3) -> (B, F, K, H, W, 3)."""
        cfg = self.cfg
        return normalize_images(images, frame_mask, cfg.image_mean, cfg.image_std, cfg.compute_dtype)

    def encode_images(self, images: jax.Array) -> jax.Array:
        """(B, F, K, H, W, 3) uint8 pixels or normalised floats -> ViT patch features (B, F, K, N, Dv)."""
        images = self.normalized_images(images)
        b, f, k = images.shape[:3]
        feats = self.vision(rearrange(images, "b f k h w c -> (b f k) h w c"))
        return rearrange(feats, "(b f k) n d -> b f k n d", b=b, f=f, k=k)

    def compress(self, feats: jax.Array, num_tokens: int) -> jax.Array:
        """(B, F, K, N, Dv) -> compressed tokens (B, F, m, Dv) (HD crops stitched first)."""
        b, f = feats.shape[:2]
        keys = self._compressor_keys(feats)
        comp = self.compressor(rearrange(keys, "b f n d -> (b f) n d"), num_tokens)
        return rearrange(comp, "(b f) m d -> b f m d", b=b, f=f)

    def _compressor_keys(self, feats: jax.Array) -> jax.Array:
        n = self.cfg.hd_grid
        if n == 1:
            return feats[:, :, 0]
        b, f = feats.shape[:2]
        crops = rearrange(feats[:, :, : n * n], "b f k n d -> (b f) k n d")
        return rearrange(stitch_crops(crops, n), "(b f) n d -> b f n d", b=b, f=f)

    def _check_views(self, images: jax.Array):
        n = self.cfg.hd_grid
        want = 1 if n == 1 else n * n + 1
        if images.shape[2] != want:
            raise ValueError(
                f"images have {images.shape[2]} views per frame, model.hd_grid={n} needs {want} "
                "(n*n crops + the whole image for HD, else 1)")

    def vision_features(self, batch: Batch) -> jax.Array:
        """The batch's ViT patch features (B, F, K, N, Dv), as `vision_and_text` reads them.

        They do not depend on the token budget: an evaluator that scores several
        budgets computes them once and passes them as `batch["vision_features"]`.
        """
        cfg = self.cfg
        ids, images, frame_mask = batch["input_ids"], batch["images"], batch["frame_mask"]
        self._check_views(images)
        # Normalised before anything else: the text-only zero image below is a zero in normalised space.
        images = self.normalized_images(images, frame_mask)
        if cfg.mode == "llava_mini" and cfg.text_only_prefusion:
            # A text-only sample is fused with an all-zero image, whatever its pixel slots hold.
            has_media = jnp.any(ids == cfg.image_token_id, axis=1)
            images = jnp.where(has_media[:, None, None, None, None, None], images, jnp.zeros((), images.dtype))
        return self.encode_images(images)

    def vision_and_text(self, batch: Batch, num_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Vision tokens for the LLM (B, V, D), their validity (B, V), and LLM text embeddings (B, T, D).

        Uses `batch["vision_features"]` (from `vision_features`) when present instead of running the ViT.
        """
        cfg = self.cfg
        ids, images, frame_mask = batch["input_ids"], batch["images"], batch["frame_mask"]
        b, f = images.shape[:2]
        text = self.embed_text(ids)
        feats = batch["vision_features"] if "vision_features" in batch else self.vision_features(batch)
        if cfg.mode == "llava15":
            tokens = self.projector(feats[:, :, 0])  # (B, F, N, D)
            valid = repeat(frame_mask, "b f -> b (f n)", n=tokens.shape[2])
            return rearrange(tokens, "b f n d -> b (f n) d"), valid, text
        comp = self.compress(feats, num_tokens)  # (B, F, m, Dv)
        comp_proj = self.projector(comp)
        valid = repeat(frame_mask, "b f -> b (f m)", m=num_tokens)
        if not cfg.prefusion_layers:
            return rearrange(comp_proj, "b f m d -> b (f m) d"), valid, text
        views = [self._compressor_keys(feats)]
        if cfg.hd_grid > 1:
            views.append(feats[:, :, cfg.hd_grid**2])  # the whole image, after the stitched crops
        seq = jnp.concatenate([self.projector(v) for v in views] + [comp_proj], axis=2)
        has_media = jnp.any(ids == cfg.image_token_id, axis=1)
        fuse = batch["attention_mask"] & batch["fuse_mask"] & (ids != cfg.image_token_id)
        if cfg.prefusion_skip_token_id >= 0:
            fuse &= ids != cfg.prefusion_skip_token_id
        if cfg.text_only_prefusion:  # the authors' zero image: frame 0 of a text-only sample counts
            frame_mask = frame_mask | (~has_media[:, None] & (jnp.arange(f) == 0)[None])
        text_f = repeat(text, "b t d -> (b f) t d", f=f)
        fuse_f = repeat(fuse, "b t -> (b f) t", f=f)
        vis_out, text_out = self.prefusion(rearrange(seq, "b f p d -> (b f) p d"), text_f, fuse_f)
        tokens = rearrange(vis_out[:, -num_tokens:], "(b f) m d -> b (f m) d", b=b)
        # Text states averaged over the sample's real frames (one frame for images).
        w = frame_mask.astype(jnp.float32)
        w = w / jnp.maximum(w.sum(axis=1, keepdims=True), 1.0)
        text_out = jnp.einsum("bf,bftd->btd", w, rearrange(text_out, "(b f) t d -> b f t d", b=b).astype(jnp.float32))
        reads_fused = has_media | cfg.text_only_prefusion
        text = jnp.where(reads_fused[:, None, None], text_out.astype(text.dtype), text)
        return tokens, valid, text

    # ------------------------------------------------------------- LLM inputs
    def build_llm_inputs(self, batch: Batch, num_vision_tokens: int | None = None,
                         align: str = "right") -> dict[str, jax.Array]:
        """The LLM's input sequence: embeds (B, L, D), valid, positions, text_index (B, L)."""
        cfg = self.cfg
        ids = batch["input_ids"]
        has_media = jnp.any(ids == cfg.image_token_id, axis=1)
        placeholder = jnp.argmax(ids == cfg.image_token_id, axis=1)
        if "images" in batch:
            m = cfg.check_budget(num_vision_tokens)
            vision, vision_valid, text = self.vision_and_text(batch, m)
        else:  # text-only batch
            text = self.embed_text(ids)
            vision = jnp.zeros((ids.shape[0], 0, text.shape[-1]), text.dtype)
            vision_valid = jnp.zeros((ids.shape[0], 0), bool)
        return merge_vision_into_text(text, batch["attention_mask"], has_media, placeholder,
                                      vision, vision_valid, align=align)

    def __call__(self, batch: Batch, num_vision_tokens: int | None = None) -> dict[str, jax.Array]:
        """Training/scoring forward: logits (B, L, V), valid and text_index (B, L)."""
        inputs = self.build_llm_inputs(batch, num_vision_tokens)
        logits, _ = self.llm(inputs["embeds"], inputs["positions"], inputs["valid"])
        return {"logits": logits, "valid": inputs["valid"], "text_index": inputs["text_index"]}

    def hidden_states(self, batch: Batch, num_vision_tokens: int | None = None) -> dict[str, jax.Array]:
        """The forward up to the LM head: final hidden states (B, L, D), validity and text_index (B, L)."""
        inputs = self.build_llm_inputs(batch, num_vision_tokens)
        hidden, _ = self.llm(inputs["embeds"], inputs["positions"], inputs["valid"], return_hidden=True)
        return {"hidden": hidden, "valid": inputs["valid"], "text_index": inputs["text_index"]}

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """LM head on final hidden states: (B, c, D) -> fp32 logits (B, c, V)."""
        return self.llm.logits(hidden).astype(jnp.float32)

    # -------------------------------------------------------------- decoding
    def decode(self, embeds: jax.Array, positions: jax.Array, key_valid: jax.Array, cache: KVCache,
               cache_index: jax.Array | int):
        """LLM step with a KV cache (prefill or one token): (logits, new cache)."""
        return self.llm(embeds, positions, key_valid, cache=cache, cache_index=cache_index)

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        return self.llm.embed(ids)

    def embed_text(self, ids: jax.Array) -> jax.Array:
        """Text embeddings (B, T, D) for pre-fusion and the LLM; detached with `detach_text_embeddings`."""
        text = self.llm.embed(ids)
        return jax.lax.stop_gradient(text) if self.cfg.detach_text_embeddings else text

