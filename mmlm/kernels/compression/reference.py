"""XLA reference of compression attention: plain jnp, the numerical reference of the Pallas kernels."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmlm.kernels.compression.plan import F32, compute_dtype


def _layernorm_f32(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """Standard LayerNorm over the last axis (biased variance), in fp32."""
    x = x.astype(F32)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * scale.astype(F32) + bias.astype(F32)


def compress_attention_xla(x: jax.Array, q: jax.Array, ln_scale: jax.Array, ln_bias: jax.Array, wk: jax.Array,
                           bk: jax.Array, wv: jax.Array, bv: jax.Array, pe_k: jax.Array, *, num_heads: int,
                           eps: float = 1e-5) -> jax.Array:
    """Plain jnp implementation (and the numerical reference).

    Shapes: x (B, N, Dv), q (m, Dv), ln_* (Dv,), w* (Dv, Dv) in (in, out)
    layout, b* (Dv,), pe_k (N, Dv). Returns (B, m, Dv) in x.dtype.
    """
    bsz, n, dv = x.shape
    m = q.shape[0]
    dh = dv // num_heads
    cdt = compute_dtype(x.dtype)
    xn = _layernorm_f32(x, ln_scale, ln_bias, eps)
    k_in = (xn + pe_k.astype(cdt).astype(F32)).astype(cdt)
    k = jnp.einsum("bnd,de->bne", k_in, wk.astype(cdt), preferred_element_type=F32) + bk.astype(F32)
    v = jnp.einsum("bnd,de->bne", xn.astype(cdt), wv.astype(cdt), preferred_element_type=F32) + bv.astype(F32)
    qh = (q.astype(F32) / math.sqrt(dh)).astype(cdt).reshape(m, num_heads, dh)
    kh = k.astype(cdt).reshape(bsz, n, num_heads, dh)
    vh = v.astype(cdt).reshape(bsz, n, num_heads, dh)
    s = jnp.einsum("mhd,bnhd->bhmn", qh, kh, preferred_element_type=F32)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhmn,bnhd->bmhd", p.astype(cdt), vh, preferred_element_type=F32)
    return o.reshape(bsz, m, dv).astype(x.dtype)
