"""`mmlm bench video-memory`: KV-cache bytes vs number of video frames, LLaVA-1.5 vs LLaVA-Mini.

For F frames the LLM's cache must hold `text + F * tokens_per_frame` slots:
N = 576 patch tokens per frame for the LLaVA-1.5 baseline, m (1 by default)
compressed tokens for LLaVA-Mini. The figures come from XLA, not from a
formula: the decode step (one new token attending to the whole cache) is
lowered and compiled for abstract shapes (`jax.ShapeDtypeStruct`, nothing is
allocated, so a 7B config runs on a laptop), with the cache donated; the
compiled program's `memory_analysis()` then reports

* `alias_size_in_bytes`: the donated buffers updated in place = the cache;
* `argument_size_in_bytes`: cache + LLM weights + the token and index.

The bench checks the cache figure against the argument total minus the
weights (from their shapes) and checks that each added frame grows the cache
by exactly `layers x kv_heads x head_dim x 2 (K and V) x bytes x
tokens_per_frame`; it exits with status 1 if either check fails.

    mmlm bench video-memory --config llava_mini_vicuna7b
    mmlm bench video-memory --config configs/tiny.py --frames 1,2,3 --json out.json
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmlm.models.config import ModelConfig
from mmlm.models.llama import LlamaModel, init_cache
from mmlm.models.llava_mini import LlavaMini


def per_token_kv_bytes(cfg: ModelConfig) -> int:
    """Cache bytes of one token: layers x kv_heads x head_dim x 2 (K, V) x bytes per element."""
    llm = cfg.llm
    return llm.layers * llm.kv_heads * llm.head_dim * 2 * jnp.dtype(cfg.compute_dtype).itemsize


def tree_nbytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def llm_param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """Abstract params of the LLM only (all a decode step reads), in the params dtype."""
    llm = LlamaModel(cfg.llm, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, scan_layers=cfg.scan_layers)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda x: llm.init(jax.random.PRNGKey(0), x, method=llm.forward_tokens), ids)
    return {"llm": nn.unbox(variables)["params"]}


def _decode_step(cfg: ModelConfig):
    """One-token decode step of an unpadded single sequence: (params, cache, token, index) -> (logits, cache)."""
    model = LlavaMini(cfg)

    def step(params, cache, token, index):
        slots = cache["k"].shape[2]
        key_valid = (jnp.arange(slots) <= index)[None, :]
        embeds = model.apply({"params": params}, token, method=LlavaMini.embed_tokens)
        positions = jnp.full(token.shape, index, jnp.int32)
        logits, cache = model.apply({"params": params}, embeds, positions, key_valid, cache, index,
                                    method=LlavaMini.decode)
        return logits[:, -1], cache

    return step


def compiled_cache_bytes(cfg: ModelConfig, slots: int, params_shapes: Any | None = None) -> dict[str, int]:
    """Compiles the decode step for a `slots`-slot cache (batch 1); returns XLA's memory figures."""
    params_shapes = params_shapes if params_shapes is not None else llm_param_shapes(cfg)
    cache = jax.eval_shape(lambda: init_cache(cfg.llm, 1, slots, cfg.compute_dtype))
    token = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    compiled = jax.jit(_decode_step(cfg), donate_argnums=1).lower(params_shapes, cache, token, index).compile()
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError(f"backend {jax.default_backend()!r} gives no memory analysis for compiled programs")
    args = int(ma.argument_size_in_bytes)
    other = tree_nbytes(params_shapes) + tree_nbytes((token, index))
    alias = int(ma.alias_size_in_bytes)
    return {"slots": slots, "argument_bytes": args, "cache_bytes_from_arguments": args - other,
            # Backends that ignore donation report no alias: fall back to the argument difference.
            "cache_bytes": alias if alias else args - other, "alias_bytes": alias,
            "temp_bytes": int(ma.temp_size_in_bytes), "expected_cache_bytes": tree_nbytes(cache)}


def measure(cfg: ModelConfig, frames: Sequence[int], text_tokens: int, tokens_per_frame: int
            ) -> list[dict[str, int]]:
    """Cache figures for each frame count F (slots = text_tokens + F * tokens_per_frame)."""
    shapes = llm_param_shapes(cfg)
    rows = []
    for f in frames:
        r = compiled_cache_bytes(cfg, text_tokens + f * tokens_per_frame, shapes)
        rows.append(dict(frames=f, tokens_per_frame=tokens_per_frame, **r))
    return rows


def per_frame_growth(rows: Sequence[dict[str, int]]) -> list[float]:
    """Cache bytes added per frame between consecutive measurements."""
    return [(b["cache_bytes"] - a["cache_bytes"]) / (b["frames"] - a["frames"]) for a, b in zip(rows, rows[1:])]


def check(rows: Sequence[dict[str, int]], cfg: ModelConfig) -> list[str]:
    """Problems found (empty = the cache is exactly text + F*t tokens' KV and grows by t tokens per frame)."""
    problems = []
    expect = per_token_kv_bytes(cfg) * rows[0]["tokens_per_frame"]
    for r in rows:
        if r["cache_bytes"] != r["cache_bytes_from_arguments"]:
            problems.append(f"F={r['frames']}: aliased cache {r['cache_bytes']} B != arguments minus weights "
                            f"{r['cache_bytes_from_arguments']} B")
        if r["cache_bytes"] != r["expected_cache_bytes"]:
            problems.append(f"F={r['frames']}: cache {r['cache_bytes']} B != shape-derived "
                            f"{r['expected_cache_bytes']} B")
    for g in per_frame_growth(rows):
        if g != expect:
            problems.append(f"per-frame growth {g} B != {expect} B")
    return problems

