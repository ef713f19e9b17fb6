"""Compression maps: where each compressed vision token looks (the paper's compression figure).

For the query compressor, the map of compressed token i is its cross-attention
distribution over the key grid (24 x 24 patches, or the stitched 48 x 48 grid
of LLaVA-Mini-HD), averaged over the heads. The fused kernel never
materialises the weights; the model's own compressor recomputes them from its
parameters in plain XLA (`return_weights=True` of
`mmlm.models.compressor.QueryCompressor`), on the keys the model builds
(`LlavaMini.encode_images`, then `LlavaMini._compressor_keys`, which stitches
HD crops):

    q = (LN_q(Q[:m]) + PE_q) W_q + b_q          (m, Dv)
    k = (LN_kv(X) + PE_k) W_k + b_k             (N, Dv)
    A = mean_heads softmax(q_h k_h^T / sqrt(dh)) (m, N)

With pooled budgets (`model.compressor.nesting="pool"`) all M queries run and
a pooled token's map is the mean of its pooled queries' maps (its output is
the mean of theirs, which are linear in their weights).

For the average-pooling compressor the map is the pooling window. The maps
are drawn as heat overlays on the image the model saw (padded to a square,
resized; HD crops stitched back), one panel per compressed token (per frame
for videos).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from PIL import Image, ImageDraw

from mmlm.models.compressor import make_compressor, square_side
from mmlm.models.config import ModelConfig
from mmlm.models.llava_mini import LlavaMini
from mmlm.safe_io import atomic_file


def query_attention(cfg: ModelConfig, compressor_params: dict[str, Any], keys: jax.Array,
                    num_tokens: int, average_heads: bool = True) -> jax.Array:
    """Attention of the first `num_tokens` queries over the keys (the model's compressor, weights out).

    keys: (B, N, Dv) compressor keys (N a square grid). Returns (B, m, N) fp32 averaged over heads
    (or (B, H, m, N) per head; H = 1 for average pooling), rows summing to 1.
    """
    compressor = make_compressor(cfg.compressor, jnp.float32, jnp.float32)
    probs = compressor.apply({"params": compressor_params}, keys, num_tokens, return_weights=True)
    return probs.mean(axis=1) if average_heads else probs


def compression_maps(cfg: ModelConfig, params: Any, images: np.ndarray, num_tokens: int | None = None
                     ) -> np.ndarray:
    """Attention maps of the compressed tokens.

    images: (B, F, K, H, W, 3) model inputs. Returns (B, F, m, g, g) float32, g x g the key grid
    (vision grid, times hd_grid for HD), each map summing to 1.
    """
    if cfg.mode != "llava_mini":
        raise ValueError("the llava15 baseline has no compressor: compression maps need a llava_mini model")
    m = cfg.check_budget(num_tokens)
    return np.asarray(_maps_jit(cfg, params, jnp.asarray(images), m))


def _compressor_keys(model: LlavaMini, images: jax.Array) -> jax.Array:
    """(B, F, K, H, W, 3) images -> the compressor's keys (B, F, N, Dv), as the model builds them."""
    return model._compressor_keys(model.encode_images(images))


def _maps(cfg: ModelConfig, params: Any, images: jax.Array, m: int) -> jax.Array:
    keys = LlavaMini(cfg).apply({"params": params}, images, method=_compressor_keys)
    b, f, n, _ = keys.shape
    g = square_side(n, "compressor keys")
    attn = query_attention(cfg, params.get("compressor", {}), rearrange(keys, "b f n d -> (b f) n d"), m)
    return rearrange(attn, "(b f) m (i j) -> b f m i j", b=b, i=g, j=g)


_maps_jit = jax.jit(_maps, static_argnames=("cfg", "m"))


# ---------------------------------------------------------------------------- drawing

# Perceptually ordered colour ramp (inferno-like) for the heat overlay: (position, RGB).
_RAMP = np.asarray([
    (0.00, (0, 0, 4)), (0.25, (87, 16, 110)), (0.50, (188, 55, 84)),
    (0.75, (249, 142, 9)), (1.00, (252, 255, 164)),
], dtype=object)


def colorize(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], any shape -> uint8 RGB (..., 3) on the inferno-like ramp."""
    pos = np.asarray([p for p, _ in _RAMP], np.float64)
    cols = np.asarray([c for _, c in _RAMP], np.float64)
    v = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
    out = np.stack([np.interp(v, pos, cols[:, ch]) for ch in range(3)], axis=-1)
    return np.round(out).astype(np.uint8)


def display_image(cfg: ModelConfig, frame_views: np.ndarray, mean: Sequence[float], std: Sequence[float]
                  ) -> Image.Image:
    """The image a frame's compressor saw: (K, H, W, 3) normalised views (or uint8 pixels) -> RGB PIL.

    HD: the n x n crops stitched back into the (nH, nW) image; otherwise view 0.
    """
    from mmlm.data.preprocess import denormalize

    pixels = frame_views if frame_views.dtype == np.uint8 else denormalize(frame_views, mean, std)
    n = cfg.hd_grid
    if n == 1:
        return Image.fromarray(pixels[0])
    crops = pixels[: n * n]
    return Image.fromarray(rearrange(crops, "(r c) h w ch -> (r h) (c w) ch", r=n, c=n))


def overlay(image: Image.Image, heat: np.ndarray, size: int, alpha: float = 0.55) -> Image.Image:
    """The image resized to size x size with `heat` (g, g) drawn over it (max-normalised)."""
    base = image.convert("RGB").resize((size, size), Image.BICUBIC)
    h = np.asarray(heat, np.float64)
    h = h / h.max() if h.max() > 0 else h
    heat_img = Image.fromarray(colorize(h)).resize((size, size), Image.BILINEAR)
    return Image.blend(base, heat_img, alpha)


def map_grid_shape(frames: int, tokens: int) -> tuple[int, int]:
    """(rows, cols) of the panel grid: a near-square grid of tokens, or frames x tokens for videos."""
    if frames == 1:
        cols = math.ceil(math.sqrt(tokens))
        return math.ceil(tokens / cols), cols
    return frames, tokens


def render_compression_map(images: Sequence[Image.Image], maps: np.ndarray, panel_size: int = 224
                           ) -> Image.Image:
    """One panel per (frame, compressed token): heat overlay + label.

    images: F display images; maps: (F, m, g, g). Returns an RGB image of
    (cols * panel_size, rows * panel_size) pixels, (rows, cols) = `map_grid_shape(F, m)`.
    """
    f, m = maps.shape[:2]
    if len(images) != f:
        raise ValueError(f"{len(images)} images for {f} frames of maps")
    rows, cols = map_grid_shape(f, m)
    canvas = Image.new("RGB", (cols * panel_size, rows * panel_size), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(f * m):
        frame, token = divmod(i, m)
        r, c = divmod(i, cols)
        x, y = c * panel_size, r * panel_size
        canvas.paste(overlay(images[frame], maps[frame, token], panel_size), (x, y))
        label = f"token {token}" + (f", frame {frame}" if f > 1 else "")
        box = draw.textbbox((x + 4, y + 3), label)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
        draw.text((x + 4, y + 3), label, fill=(255, 255, 255))
    return canvas


def save_compression_map(path: str, cfg: ModelConfig, params: Any, pixels: np.ndarray, *,
                         num_tokens: int | None, mean: Sequence[float], std: Sequence[float],
                         panel_size: int = 224, max_frames: int = 8) -> tuple[int, int]:
    """Computes and writes the compression map of one image/video; returns the PNG's (width, height).

    pixels: (F, K, H, W, 3) model inputs; at most `max_frames` frames (evenly spaced) are drawn.
    """
    if pixels.shape[0] > max_frames:
        keep = np.linspace(0, pixels.shape[0] - 1, max_frames).round().astype(int)
        pixels = pixels[keep]
    maps = compression_maps(cfg, params, pixels[None], num_tokens)[0]
    shown = [display_image(cfg, frame, mean, std) for frame in pixels]
    img = render_compression_map(shown, maps, panel_size)
    with atomic_file(path) as tmp:  # complete or absent, never a truncated PNG over an earlier map
        img.save(tmp)
    return img.size
