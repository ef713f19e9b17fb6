"""Vision-token compressors, working in the vision width Dv before the projector.

`QueryCompressor` is the LLaVA-Mini resampler made Matryoshka: M learned
queries, nested in one of three ways (`CompressorConfig.nesting`):

* "prefix" (MQT): a budget of m tokens uses the first m queries (in
  `matryoshka_order`). The queries never attend to each other, so the
  m-token output is exactly the first m rows of the M-token output.
* "pool" (M3): every budget computes all M queries (raster order) and
  average-pools their C x C outputs to sqrt(m) x sqrt(m): the 1-token budget
  is the mean of the 16 (M = 16) outputs, so each query trains at every budget
  instead of one query serving both as the whole image and as one cell.
* "offset": "prefix" plus a learned offset (zero at init) on the m queries of
  each trained budget m < M: the same query grid, but the 1-token query may
  move away from its cell's role. The m-token output is then not a slice of
  the M-token output (the compressor runs per budget; the vision tower still
  runs once).

With budgets empty and M = C^2 it is the LLaVA-Mini compressor, parameter for
parameter:

    q_in = LN_q(Q) + PE_q        k_in = LN_kv(X) + PE_k        v_in = LN_kv(X)
    out  = MultiheadAttention(q_in, k_in, v_in)    (packed in-proj, 8 heads)

PE_q is the C x C sin-cos table; PE_k that table bicubically resized (torch
semantics) to the key grid. The cross-attention core (LN_kv, K/V projection,
softmax attention) runs through `mmlm.kernels.compress_attention`, which is a
fused Pallas kernel on GPU/TPU and plain XLA on CPU (`impl`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmlm.kernels import compress_attention
from mmlm.models.config import CompressorConfig
from mmlm.models.layers import dense, kernel_initializer, layer_norm
from mmlm.models.positions import (adaptive_avg_pool_matrix, key_position_table, matryoshka_order,
                                   resize_position_table, sincos_2d)


class LayerNormParams(nn.Module):
    """The (scale, bias) of a LayerNorm applied elsewhere (inside a fused kernel)."""

    dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("vision_embed",)),
                           (self.dim,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vision_embed",)),
                          (self.dim,), self.param_dtype)
        return scale, bias


def square_side(n: int, what: str) -> int:
    """The side of a square grid of n tokens (a ValueError naming `what` if n is not a square)."""
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{what} must form a square grid, got {n} tokens")
    return side


def query_position_table(cfg: CompressorConfig, dim: int) -> np.ndarray:
    """(M, dim) query position codes in query order (Matryoshka-permuted when on)."""
    table = sincos_2d(dim, cfg.grid)
    if cfg.matryoshka and not cfg.pooled:
        table = table[matryoshka_order(cfg.grid, cfg.budgets)]
    return table


def pool_queries(x: jax.Array, grid: int, num_tokens: int, axis: int) -> jax.Array:
    """Average-pools the C x C query axis `axis` of x (raster order) to sqrt(m) x sqrt(m) (identity at m = C^2).

    Used on outputs (B, M, Dv) -> (B, m, Dv) and on attention weights (B, H, M, N) -> (B, H, m, N): the
    queries' outputs are linear in their weights, so pooled weights are the pooled tokens' weights.
    """
    if num_tokens == grid * grid:
        return x
    pool = jnp.asarray(adaptive_avg_pool_matrix(grid, square_side(num_tokens, "pooled budget")), x.dtype)
    return jnp.moveaxis(jnp.tensordot(pool, x, axes=((1,), (axis,))), 0, axis)


class QueryCompressor(nn.Module):
    """features (B, N, Dv), N a square key grid -> (B, m, Dv).

    With pooled budgets (`cfg.pooled`) all M queries run and their outputs are pooled to m.
    With `return_weights=True` it returns the cross-attention weights instead,
    (B, heads, m, N) fp32, rows summing to 1 (the fused kernel never
    materialises them; they are recomputed from the same parameters in plain
    XLA): softmax_n(q_h . k_h / sqrt(dh)) with k = (LN_kv(X) + PE_k) W_k + b_k.
    """

    cfg: CompressorConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_std: float = 0.02  # out_proj kernel at init (layers.kernel_initializer)

    @nn.compact
    def __call__(self, x: jax.Array, num_tokens: int, return_weights: bool = False) -> jax.Array:
        cfg = self.cfg
        b, n, dv = x.shape
        if not 1 <= num_tokens <= cfg.tokens:
            raise ValueError(f"compressor asked for {num_tokens} tokens, it has {cfg.tokens} queries")
        if dv % cfg.heads:
            raise ValueError(f"vision width {dv} is not divisible by compressor.heads={cfg.heads}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        query = self.param("query", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                 ("queries", "vision_embed")),
                           (cfg.tokens, dv), self.param_dtype)
        ln_q = layer_norm(cfg.ln_eps, name="ln_q", axis="vision_embed", **kw)
        # LN_kv is applied inside the fused kernel, which takes its raw parameters.
        ln_kv_scale, ln_kv_bias = LayerNormParams(dv, self.param_dtype, name="ln_kv")()
        w_in = self.param("in_proj_kernel", nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                                         ("vision_embed", "qkv")),
                          (dv, 3 * dv), self.param_dtype)
        b_in = self.param("in_proj_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("qkv",)),
                          (3 * dv,), self.param_dtype)
        out_proj = dense(dv, ("qkv", "vision_embed"), use_bias=True, name="out_proj",
                         kernel_init=kernel_initializer(self.init_std), **kw)

        key_grid = square_side(n, "compressor keys")
        rows = cfg.query_rows(num_tokens)  # m, or all M queries when the budgets are pools of them
        if cfg.stored_position_table:
            # The release's fixed table, read from the weights; stop_gradient (and no weight decay on the
            # name) keeps it fixed in training.
            init = lambda key, shape, dtype: jnp.asarray(sincos_2d(shape[1], cfg.grid), dtype)
            table = jax.lax.stop_gradient(self.param(
                "pos_embed", nn.with_logical_partitioning(init, ("queries", "vision_embed")), (cfg.tokens, dv),
                self.param_dtype))
            pe_q = table[:rows].astype(self.dtype)
            pe_k = resize_position_table(table, cfg.grid, key_grid).astype(self.dtype)
        else:
            pe_q = jnp.asarray(query_position_table(cfg, dv)[:rows], self.dtype)
            pe_k = jnp.asarray(key_position_table(dv, cfg.grid, key_grid), self.dtype)
        w_in, b_in = w_in.astype(self.dtype), b_in.astype(self.dtype)
        wq, wk, wv = w_in[:, :dv], w_in[:, dv:2 * dv], w_in[:, 2 * dv:]
        bq, bk, bv = b_in[:dv], b_in[dv:2 * dv], b_in[2 * dv:]
        queries = query[:rows]
        offsets = cfg.offset_rows()
        if offsets:
            table = self.param("budget_offset", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                             ("queries", "vision_embed")),
                               (sum(offsets.keys()), dv), self.param_dtype)  # m rows per budget m
            if num_tokens in offsets:
                queries = queries + table[offsets[num_tokens]: offsets[num_tokens] + num_tokens]
        # Queries are shared by the whole batch: project them once, (rows, Dv).
        q = (ln_q(queries.astype(self.dtype)) + pe_q) @ wq + bq
        if return_weights:
            probs = _attention_weights(x, q, ln_kv_scale, ln_kv_bias, wk, bk, pe_k, cfg.heads, cfg.ln_eps)
            return pool_queries(probs, cfg.grid, num_tokens, axis=2) if cfg.pooled else probs
        attn = compress_attention(
            x.astype(self.dtype), q, ln_kv_scale.astype(self.dtype), ln_kv_bias.astype(self.dtype),
            wk, bk, wv, bv, pe_k, num_heads=cfg.heads, eps=cfg.ln_eps, impl=cfg.impl)
        out = out_proj(attn)
        return pool_queries(out, cfg.grid, num_tokens, axis=1) if cfg.pooled else out


def _attention_weights(x: jax.Array, q: jax.Array, ln_scale: jax.Array, ln_bias: jax.Array, wk: jax.Array,
                       bk: jax.Array, pe_k: jax.Array, heads: int, eps: float) -> jax.Array:
    """(B, heads, m, N) fp32 softmax weights of queries q (m, Dv) over the keys of x (B, N, Dv)."""
    f32 = lambda a: a.astype(jnp.float32)
    x = f32(x)
    mu = x.mean(-1, keepdims=True)
    xn = (x - mu) * jax.lax.rsqrt(jnp.square(x - mu).mean(-1, keepdims=True) + eps) * f32(ln_scale) + f32(ln_bias)
    k = (xn + f32(pe_k)) @ f32(wk) + f32(bk)
    dh = x.shape[-1] // heads
    qh = f32(q).reshape(q.shape[0], heads, dh)
    kh = k.reshape(x.shape[0], x.shape[1], heads, dh)
    return jax.nn.softmax(jnp.einsum("mhd,bnhd->bhmn", qh, kh) / jnp.sqrt(jnp.float32(dh)), axis=-1)


class AvgPoolCompressor(nn.Module):
    """Adaptive average pooling of the key grid to sqrt(m) x sqrt(m) (the paper's ablation).

    With `return_weights=True`: the pooling windows as (B, 1, m, N) fp32 weights, rows summing to 1.
    """

    cfg: CompressorConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, num_tokens: int, return_weights: bool = False) -> jax.Array:
        side = square_side(num_tokens, "average-pooling budget")
        pool = adaptive_avg_pool_matrix(square_side(x.shape[1], "compressor keys"), side)
        if return_weights:
            return jnp.broadcast_to(jnp.asarray(pool, jnp.float32), (x.shape[0], 1) + pool.shape)
        return jnp.einsum("mn,bnd->bmd", jnp.asarray(pool, x.dtype), x)


def make_compressor(cfg: CompressorConfig, dtype, param_dtype, name: str = "compressor",
                    init_std: float = 0.02) -> nn.Module:
    if cfg.kind == "query":
        return QueryCompressor(cfg, dtype=dtype, param_dtype=param_dtype, init_std=init_std, name=name)
    if cfg.kind == "avgpool":
        return AvgPoolCompressor(cfg, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"unknown compressor kind {cfg.kind!r}; use 'query' or 'avgpool'")
