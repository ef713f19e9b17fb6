"""Random model parameters without compiling `model.init`.

Benchmarks and tests need weights of the right shapes but not trained ones.
`jax.jit(model.init)` compiles the whole forward pass (tens of seconds on a
small CPU); this builds the same tree from `jax.eval_shape` (tracing only)
and fills it with numpy random numbers: normalisation scales 1, biases 0,
everything else N(0, std^2) — the same statistics as the model's own init.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmlm.models.config import ModelConfig
from mmlm.models.summary import abstract_params


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> Any:
    """Concrete random params with the shapes and dtypes of `LlavaMini(cfg)`'s."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            value = np.ones(leaf.shape, np.float32)
        elif name == "bias":
            value = np.zeros(leaf.shape, np.float32)
        else:
            value = rng.standard_normal(leaf.shape, np.float32) * std
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract_params(cfg))
