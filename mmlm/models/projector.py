"""Vision-to-LLM projector: `linear` or `mlp{N}x_gelu` (exact erf GELU)."""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmlm.models.layers import dense, gelu_exact, kernel_initializer


def projector_depth(kind: str) -> int:
    """Number of Linear layers of a projector type (`linear` = 1, `mlp2x_gelu` = 2)."""
    if kind == "linear":
        return 1
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not match:
        raise ValueError(f"unknown projector type {kind!r}; use 'linear' or 'mlpNx_gelu' (e.g. mlp2x_gelu)")
    return int(match.group(1))


class Projector(nn.Module):
    """(..., Dv) -> (..., D). Layer names `linear_{i}` follow torch `Sequential` indices (0, 2, ...)."""

    kind: str
    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_std: float = 0.02  # dense kernels at init (layers.kernel_initializer)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True,
                  kernel_init=kernel_initializer(self.init_std))
        depth = projector_depth(self.kind)
        x = dense(self.out_dim, ("vision_embed", "mlp"), name="linear_0", **kw)(x)
        for i in range(1, depth):
            x = dense(self.out_dim, ("mlp", "embed"), name=f"linear_{2 * i}", **kw)(gelu_exact(x))
        return x
