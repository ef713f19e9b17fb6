"""Abstract shapes of a config: batches, parameters, and the `mmlm summary` report (parameter counts,
vision tokens and sequence lengths).

Shapes come from `jax.eval_shape` of the model's init, so nothing is
allocated: a 7B config answers in seconds on a laptop.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mmlm.models.config import PARTS, ModelConfig
from mmlm.models.layers import count_params
from mmlm.models.llava_mini import LlavaMini


def batch_shapes(cfg: ModelConfig, batch: int, text_len: int, frames: int, labels: bool = False,
                 images_dtype: Any = jnp.float32) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{name: (shape, dtype)} of a model batch (`labels` too for a training batch).

    `images` (batch, frames, K, H, W, 3) have `images_dtype`: float32 (normalised, as inference feeds
    them) or uint8 (pixels, as the training pipeline yields them with data.pixels_on_device).
    """
    views = 1 if cfg.hd_grid == 1 else cfg.hd_grid**2 + 1
    s = cfg.image_size
    shapes = {
        "input_ids": ((batch, text_len), jnp.int32),
        "attention_mask": ((batch, text_len), jnp.bool_),
        "fuse_mask": ((batch, text_len), jnp.bool_),
        "images": ((batch, frames, views, s, s, 3), images_dtype),
        "frame_mask": ((batch, frames), jnp.bool_),
    }
    if labels:
        shapes["labels"] = ((batch, text_len), jnp.int32)
    return shapes


def dummy_batch(cfg: ModelConfig, batch: int = 1, text_len: int = 16, frames: int = 1,
                abstract: bool = True) -> dict[str, Any]:
    """A batch of the right shapes (one `<image>` placeholder per sample at position 1)."""
    shapes = batch_shapes(cfg, batch, text_len, frames)
    views, s = shapes["images"][0][2], cfg.image_size
    if abstract:
        return {k: jax.ShapeDtypeStruct(shape, dt) for k, (shape, dt) in shapes.items()}
    ids = np.ones((batch, text_len), np.int32)
    ids[:, 1] = cfg.image_token_id
    return {
        "input_ids": ids,
        "attention_mask": np.ones((batch, text_len), bool),
        "fuse_mask": ids != cfg.image_token_id,
        "images": np.zeros((batch, frames, views, s, s, 3), np.float32),
        "frame_mask": np.ones((batch, frames), bool),
    }


def split_static(args: Sequence[Any]) -> tuple[list[int], Callable[[Sequence[Any]], list[Any]]]:
    """Indices of the abstract args (pytrees of ShapeDtypeStructs) and a function rebuilding the full arg list.

    Everything else (None, Python ints such as a token budget) stays static.
    """
    def abstract(a: Any) -> bool:
        leaves = jax.tree.leaves(a)
        return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)

    dynamic = [i for i, a in enumerate(args) if abstract(a)]

    def rebuild(values: Sequence[Any]) -> list[Any]:
        full = list(args)
        for i, v in zip(dynamic, values):
            full[i] = v
        return full

    return dynamic, rebuild


def abstract_params(model: ModelConfig | nn.Module, *args: Any, method: Callable | str | None = None,
                    **kwargs: Any) -> dict:
    """Unboxed parameter ShapeDtypeStructs, without allocating anything.

    `model` is a `ModelConfig` (the whole LlavaMini, initialised on a dummy
    batch) or a module initialised on `args` (+ `method`, `kwargs`): pytrees
    of ShapeDtypeStructs among `args` are traced, the rest (None, ints) stays
    static. A parameter-free module (average pooling) gives {}.
    """
    if isinstance(model, ModelConfig):
        if args or kwargs or method is not None:
            raise TypeError("abstract_params(ModelConfig) takes no inputs: it initialises on a dummy batch")
        return abstract_params(LlavaMini(model), dummy_batch(model))
    dynamic, rebuild = split_static(args)

    def init(*values):
        variables = model.init(jax.random.key(0), *rebuild(values), method=method, **kwargs)
        return nn.unbox(variables).get("params", {})

    return jax.eval_shape(init, *(args[i] for i in dynamic))


def summarize(cfg: ModelConfig, text_len: int = 64) -> dict[str, Any]:
    params = abstract_params(cfg)
    counts = {part: count_params(params.get(part, {})) for part in PARTS}
    counts["total"] = sum(counts.values())
    v = cfg.vision
    n = v.num_patches
    m = cfg.check_budget(None)
    seq: dict[str, int] = {"text": text_len, "vision_patches_per_view": n}
    if cfg.mode == "llava_mini" and cfg.prefusion_layers:
        views = n * cfg.hd_grid**2 + (n if cfg.hd_grid > 1 else 0)
        seq["prefusion"] = views + m + text_len
    seq["llm"] = text_len - 1 + m
    return {
        "params": counts,
        "llm_vision_tokens": m,
        "budgets": list(cfg.supported_budgets),
        "vision_blocks_built": v.blocks_used,
        "sequence_lengths": seq,
    }
