"""Modality pre-fusion (LLaVA-Mini): a few LLM-shaped decoder blocks that let the
instruction text read the image before the LLM does.

Sequence per image/frame: `[vision tokens (P) , text (T)]`, where the vision
part ends with the compressed tokens. Attention is causal plus a key-padding
mask that hides text positions that are padding, the image placeholder or a
response token (only instruction text is fused). Position ids are the running
count of unmasked positions minus one (masked positions get 0).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmlm.models.config import LlamaConfig
from mmlm.models.layers import BTD, constrain, positions_from_valid
from mmlm.models.llama import block_stack


class PreFusion(nn.Module):
    cfg: LlamaConfig
    num_layers: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "auto"
    scan_unroll: int = 1
    init_std: float = 0.02  # dense kernels at init (layers.kernel_initializer)

    @nn.compact
    def __call__(self, vision: jax.Array, text: jax.Array, fuse: jax.Array) -> tuple[jax.Array, jax.Array]:
        """vision: (B, P, D); text: (B, T, D); fuse: (B, T) bool, text positions to fuse.

        Returns (vision hidden states (B, P, D), text (B, T, D)); text positions
        that are not fused keep their input embedding.
        """
        p = vision.shape[1]
        x = constrain(jnp.concatenate([vision, text], axis=1).astype(self.dtype), BTD)
        valid = jnp.concatenate([jnp.ones(vision.shape[:2], bool), fuse], axis=1)
        positions = positions_from_valid(valid)
        stack = block_stack(self.cfg, self.num_layers, self.dtype, self.param_dtype, self.scan_layers,
                            self.remat, name="blocks", attention=self.attention, unroll=self.scan_unroll,
                            init_std=self.init_std)
        out, _ = stack(x, None, positions, None, valid)
        fused_text = jnp.where(fuse[..., None], out[:, p:], text.astype(self.dtype))
        return out[:, :p], fused_text
