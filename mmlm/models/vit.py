"""CLIP-compatible ViT vision encoder.

Matches `transformers.CLIPVisionModel` up to the selected hidden state:
patch conv (no bias) + class token + learned positions, `pre_layrnorm`, then
pre-LN blocks with quick-GELU MLPs. Only the blocks whose output reaches
`select_layer` are built (see `VisionConfig.blocks_used`); the post-LayerNorm
never touches `hidden_states[k]` and is not built either.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from mmlm.models.config import VisionConfig
from mmlm.kernels.attention import self_attention
from mmlm.models.layers import (ACT_BATCH, ACT_HEADS, ACT_LENGTH, ACT_MLP, BTD, BlockStack, constrain, dense,
                                kernel_initializer, layer_norm, quick_gelu)


def sincos2d(grid: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """A fixed 2-D sin-cos position table, (grid * grid, width), patches in row-major order.

    A quarter of the channels each are the sine / cosine of the row and of the
    column at geometric frequencies (the "sincos2d" embedding of big_vision's
    ViTs). Rows and columns are strong, separable directions from the first
    step, where CLIP's std-0.02 init is a few per cent of a patch embedding.
    """
    if width % 4:
        raise ValueError(f"sincos2d position embeddings need a width divisible by 4, got {width}")
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4))
    r, c = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    return np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1).astype(np.float32)


def sincos2d_init(grid: int) -> Callable[..., jax.Array]:
    """Initializer of the (1 + grid^2, width) position parameter: zeros for the class token, then `sincos2d`."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        del key  # deterministic
        return jnp.asarray(np.concatenate([np.zeros((1, shape[1]), np.float32), sincos2d(grid, shape[1])]), dtype)

    return init


class VitBlock(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "auto"  # mmlm.kernels.attention implementation
    init_std: float = 0.02  # dense kernels at init (layers.kernel_initializer)

    @nn.compact
    def __call__(self, x: jax.Array, state):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dk = dict(kw, kernel_init=kernel_initializer(self.init_std))
        b, n, d = x.shape
        dh = d // cfg.heads
        x = constrain(x, BTD)
        h = layer_norm(cfg.layer_norm_eps, name="layer_norm1", axis="embed", **kw)(x)
        q = dense(d, ("embed", "heads"), use_bias=True, name="q_proj", **dk)(h)
        k = dense(d, ("embed", "heads"), use_bias=True, name="k_proj", **dk)(h)
        v = dense(d, ("embed", "heads"), use_bias=True, name="v_proj", **dk)(h)
        split = lambda t: constrain(t.reshape(b, n, cfg.heads, dh), (ACT_BATCH, ACT_LENGTH, ACT_HEADS, None))
        attn = self_attention(split(q), split(k), split(v), None, causal=False, impl=self.attention).reshape(b, n, d)
        x = x + dense(d, ("heads", "embed"), use_bias=True, name="out_proj", **dk)(attn)
        h = layer_norm(cfg.layer_norm_eps, name="layer_norm2", axis="embed", **kw)(x)
        h = quick_gelu(dense(cfg.mlp_dim, ("embed", "mlp"), use_bias=True, name="fc1", **dk)(h))
        h = constrain(h, (ACT_BATCH, ACT_LENGTH, ACT_MLP))
        x = x + dense(d, ("mlp", "embed"), use_bias=True, name="fc2", **dk)(h)
        return constrain(x, BTD), None


class VisionTower(nn.Module):
    """images (B, H, W, 3) channels-last, CLIP-normalised -> patch features (B, N, width)."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "auto"
    scan_unroll: int = 1
    init_std: float = 0.02

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.cfg
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"vision tower expects {cfg.image_size}x{cfg.image_size} images, got {images.shape[1:3]}")
        patches = nn.Conv(
            cfg.width, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size, padding="VALID",
            use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                     ("conv_h", "conv_w", "channels", "embed")),
            name="patch_embedding")(images.astype(self.dtype))
        x = constrain(rearrange(patches, "b h w d -> b (h w) d"), BTD)
        cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                         (cfg.width,), self.param_dtype)
        pos_init = sincos2d_init(cfg.grid) if cfg.position_init == "sincos2d" else nn.initializers.normal(0.02)
        pos = self.param("position_embedding", nn.with_logical_partitioning(pos_init, ("patches", "embed")),
                         (cfg.num_patches + 1, cfg.width), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
        x = layer_norm(cfg.layer_norm_eps, name="pre_layrnorm", axis="embed",
                       dtype=self.dtype, param_dtype=self.param_dtype)(x)
        if cfg.blocks_used:
            x, _ = BlockStack(VitBlock, (("cfg", cfg), ("dtype", self.dtype), ("param_dtype", self.param_dtype),
                                         ("attention", self.attention), ("init_std", self.init_std)),
                              cfg.blocks_used, scan=self.scan_layers, remat=self.remat,
                              unroll=self.scan_unroll, name="encoder")(x, None)
        return x[:, 1:]  # drop the class token
