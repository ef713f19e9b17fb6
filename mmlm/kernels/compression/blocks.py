"""Kernel-body building blocks shared by the TPU and GPU schedules.

Per-tile math on one ``(block_n, Dvp)`` tile of ``x`` (dots with fp32
accumulation, LayerNorm row statistics, K/V projection of one head, masked
scores, block-local softmax), the kernel ref tuples and operand BlockSpecs,
the backward of one tile (attention, projections, LayerNorm) and the
arguments of the backward ``pallas_call`` that both schedules share.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mmlm.kernels.compression.cost import cost_estimate
from mmlm.kernels.compression.plan import F32, Plan

# Finite "minus infinity" for masked scores: exp(_MASK - m) underflows to
# exactly 0 and never produces inf - inf = NaN.
_MASK = -1e30


def _precision(a: jax.Array):
    # fp32 operands: ask for true fp32 (TPU otherwise uses one bf16 pass).
    return jax.lax.Precision.HIGHEST if a.dtype == F32 else None


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b with fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a), preferred_element_type=F32)


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T with fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a), preferred_element_type=F32)


def _dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a.T @ b with fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_precision(a), preferred_element_type=F32)


def _chunks(plan: Plan) -> list[slice]:
    """Static channel chunks of the (padded) Dv axis."""
    return [slice(c, c + plan.block_d) for c in range(0, plan.dv_pad, plan.block_d)]


def _channel_mask(cols: slice, plan: Plan) -> jax.Array | None:
    """(1, block_d) bool mask of real (unpadded) channels, None if no padding."""
    if cols.stop <= plan.dv:
        return None
    ids = cols.start + jax.lax.broadcasted_iota(jnp.int32, (1, plan.block_d), 1)
    return ids < plan.dv


def key_mask(j: jax.Array, plan: Plan) -> jax.Array:
    """(1, block_n) bool mask of real (unpadded) keys in N-block j."""
    ids = j * plan.block_n + jax.lax.broadcasted_iota(jnp.int32, (1, plan.block_n), 1)
    return ids < plan.n


def row_stats(x_ref, plan: Plan) -> tuple[jax.Array, jax.Array]:
    """LayerNorm mean and 1/std per row, (block_n, 1) each, two-pass (stable)."""
    total = jnp.zeros((plan.block_n, 1), F32)
    for cols in _chunks(plan):
        total += jnp.sum(x_ref[:, cols].astype(F32), axis=1, keepdims=True)
    mu = total / plan.dv
    sq = jnp.zeros((plan.block_n, 1), F32)
    for cols in _chunks(plan):
        xc = x_ref[:, cols].astype(F32) - mu
        mask = _channel_mask(cols, plan)
        if mask is not None:
            xc = jnp.where(mask, xc, 0.0)
        sq += jnp.sum(xc * xc, axis=1, keepdims=True)
    return mu, jax.lax.rsqrt(sq / plan.dv + plan.eps)


def _normalize(x_ref, g_ref, b_ref, cols: slice, mu, rstd, plan: Plan) -> tuple[jax.Array, jax.Array]:
    """(xhat, xn) of one channel chunk, fp32 (block_n, block_d); padded channels are 0."""
    xhat = (x_ref[:, cols].astype(F32) - mu) * rstd
    mask = _channel_mask(cols, plan)
    if mask is not None:
        xhat = jnp.where(mask, xhat, 0.0)
    return xhat, xhat * g_ref[:, cols] + b_ref[:, cols]


def project_head(refs: "InRefs", h, mu, rstd, plan: Plan) -> tuple[jax.Array, jax.Array]:
    """k, v of head h for the tile: fp32 (block_n, dhp) each."""
    k = jnp.zeros((plan.block_n, plan.dh_pad), F32)
    v = jnp.zeros((plan.block_n, plan.dh_pad), F32)
    for cols in _chunks(plan):
        _, xn = _normalize(refs.x, refs.ln_scale, refs.ln_bias, cols, mu, rstd, plan)
        k_in = (xn + refs.pe[:, cols].astype(F32)).astype(plan.cdt)
        k += _dot(k_in, refs.wk[h, cols, :])
        v += _dot(xn.astype(plan.cdt), refs.wv[h, cols, :])
    return k + refs.bk[h], v + refs.bv[h]


def _scores(q: jax.Array, k: jax.Array, valid: jax.Array, plan: Plan) -> jax.Array:
    """Masked scaled scores (mp, block_n), fp32 (q is pre-scaled)."""
    return jnp.where(valid, _dot_nt(q, k.astype(plan.cdt)), _MASK)


def block_softmax(q, k, v, valid, plan: Plan) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Block-local softmax partials: row max (mp,1), row sum (mp,1), unnormalised out (mp,dhp)."""
    s = _scores(q, k, valid, plan)
    m_blk = jnp.max(s, axis=1, keepdims=True)
    e = jnp.exp(s - m_blk)
    return m_blk, jnp.sum(e, axis=1, keepdims=True), _dot(e.astype(plan.cdt), v.astype(plan.cdt))


class InRefs(NamedTuple):
    """Kernel input refs in Operands order (x, pe tiles; everything else whole)."""

    x: object
    pe: object
    ln_scale: object
    ln_bias: object
    q: object
    wk: object
    bk: object
    wv: object
    bv: object


def operand_specs(plan: Plan, index_map: Callable) -> list[pl.BlockSpec]:
    """BlockSpecs for Operands; index_map(b, j) gives the grid's batch/block ids."""
    whole = lambda shape: pl.BlockSpec(shape, lambda *g: (0,) * len(shape))
    dvp, hp = plan.dv_pad, (plan.heads, 1, plan.dh_pad)
    return [
        pl.BlockSpec((None, plan.block_n, dvp), lambda *g: (index_map(*g)[0], index_map(*g)[1], 0)),
        pl.BlockSpec((plan.block_n, dvp), lambda *g: (index_map(*g)[1], 0)),
        whole((1, dvp)),
        whole((1, dvp)),
        whole((plan.heads, plan.m_pad, plan.dh_pad)),
        whole((plan.heads, dvp, plan.dh_pad)),
        whole(hp),
        whole((plan.heads, dvp, plan.dh_pad)),
        whole(hp),
    ]


# Per head, with p = exp(s - lse) the saved softmax and Delta = rowsum(dO * O):
#   dV = p^T dO            dP = dO V^T          dS = p * (dP - Delta)
#   dQs += dS K            dK = dS^T Qs         (Qs = Q / sqrt(dh))
# Through k = (xn + pe) Wk + bk and v = xn Wv + bv:
#   dWk += (xn + pe)^T dK  dbk += colsum(dK)   dWv += xn^T dV   dbv += colsum(dV)
#   dxn  = sum_h dK Wk_h^T + dV Wv_h^T
# Through xn = xhat * g + beta, xhat = (x - mu) * rstd (means over the true Dv):
#   dg += colsum(dxn * xhat)  dbeta += colsum(dxn)
#   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dxn * g


class GradRefs(NamedTuple):
    """Backward outputs: dx tile (block_n, Dvp) f32 plus whole-array accumulators."""

    dx: object
    dq: object  # (H, mp, dhp), gradient w.r.t. the pre-scaled q
    dwk: object  # (H, Dvp, dhp)
    dbk: object  # (H, 1, dhp)
    dwv: object
    dbv: object
    dg: object  # (1, Dvp)
    dbeta: object  # (1, Dvp)


Accumulate = Callable[[object, tuple, jax.Array], None]


def bwd_tile(ins: InRefs, do_ref, lse_ref, delta_ref, out: GradRefs, j, accumulate: Accumulate, plan: Plan):
    """All gradient contributions of one (batch element, N-block) tile."""
    cdt = plan.cdt
    chunks = _chunks(plan)
    mu, rstd = row_stats(ins.x, plan)
    valid = key_mask(j, plan)
    for cols in chunks:  # dx tile doubles as the dxn accumulator (fp32)
        out.dx[:, cols] = jnp.zeros((plan.block_n, plan.block_d), F32)

    def head(h, carry):
        q, do = ins.q[h], do_ref[h]
        k, v = project_head(ins, h, mu, rstd, plan)
        p = jnp.exp(_scores(q, k, valid, plan) - lse_ref[h])  # masked keys -> 0
        ds = p * (_dot_nt(do, v.astype(cdt)) - delta_ref[h])
        dv = _dot_tn(p.astype(cdt), do)
        dk = _dot_tn(ds.astype(cdt), q)
        accumulate(out.dq, (h,), _dot(ds.astype(cdt), k.astype(cdt)))
        accumulate(out.dbk, (h,), jnp.sum(dk, axis=0, keepdims=True))
        accumulate(out.dbv, (h,), jnp.sum(dv, axis=0, keepdims=True))
        dk, dv = dk.astype(cdt), dv.astype(cdt)
        for cols in chunks:
            _, xn = _normalize(ins.x, ins.ln_scale, ins.ln_bias, cols, mu, rstd, plan)
            k_in = (xn + ins.pe[:, cols].astype(F32)).astype(cdt)
            accumulate(out.dwk, (h, cols, slice(None)), _dot_tn(k_in, dk))
            accumulate(out.dwv, (h, cols, slice(None)), _dot_tn(xn.astype(cdt), dv))
            dxn = _dot_nt(dk, ins.wk[h, cols, :]) + _dot_nt(dv, ins.wv[h, cols, :])
            out.dx[:, cols] = out.dx[:, cols] + dxn
        return carry

    jax.lax.fori_loop(0, plan.heads, head, 0)
    _layernorm_bwd(ins, out, mu, rstd, accumulate, plan)


def _layernorm_bwd(ins: InRefs, out: GradRefs, mu, rstd, accumulate: Accumulate, plan: Plan):
    """Turns the dxn held in out.dx into dx; accumulates dg and dbeta."""
    mean_dxhat = jnp.zeros((plan.block_n, 1), F32)
    mean_dxhat_xhat = jnp.zeros((plan.block_n, 1), F32)
    for cols in _chunks(plan):
        xhat, _ = _normalize(ins.x, ins.ln_scale, ins.ln_bias, cols, mu, rstd, plan)
        dxn = out.dx[:, cols]
        dxhat = dxn * ins.ln_scale[:, cols]
        mean_dxhat += jnp.sum(dxhat, axis=1, keepdims=True) / plan.dv
        mean_dxhat_xhat += jnp.sum(dxhat * xhat, axis=1, keepdims=True) / plan.dv
        accumulate(out.dg, (slice(None), cols), jnp.sum(dxn * xhat, axis=0, keepdims=True))
        accumulate(out.dbeta, (slice(None), cols), jnp.sum(dxn, axis=0, keepdims=True))
    for cols in _chunks(plan):
        xhat, _ = _normalize(ins.x, ins.ln_scale, ins.ln_bias, cols, mu, rstd, plan)
        dxhat = out.dx[:, cols] * ins.ln_scale[:, cols]
        dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
        mask = _channel_mask(cols, plan)
        out.dx[:, cols] = dx if mask is None else jnp.where(mask, dx, 0.0)


def _grad_shapes(plan: Plan) -> list[jax.ShapeDtypeStruct]:
    hd = (plan.heads, plan.dv_pad, plan.dh_pad)
    hb = (plan.heads, 1, plan.dh_pad)
    shapes = [(plan.batch, plan.n_pad, plan.dv_pad), (plan.heads, plan.m_pad, plan.dh_pad), hd, hb, hd, hb,
              (1, plan.dv_pad), (1, plan.dv_pad)]
    return [jax.ShapeDtypeStruct(s, F32) for s in shapes]


def backward_call_args(plan: Plan) -> tuple[list[pl.BlockSpec], dict]:
    """in_specs and the other ``pallas_call`` arguments of the backward kernel, grid (B, nb), both schedules."""
    hm = (plan.heads, plan.m_pad)
    per_b = lambda last: pl.BlockSpec((None, *hm, last), lambda b, j: (b, 0, 0, 0))
    in_specs = operand_specs(plan, lambda b, j: (b, j)) + [per_b(plan.dh_pad), per_b(1), per_b(1)]
    shapes = _grad_shapes(plan)
    whole = lambda s: pl.BlockSpec(s.shape, lambda b, j: (0,) * len(s.shape))
    out_specs = [pl.BlockSpec((None, plan.block_n, plan.dv_pad), lambda b, j: (b, j, 0))]
    out_specs += [whole(s) for s in shapes[1:]]
    common = dict(
        grid=(plan.batch, plan.num_blocks), out_specs=out_specs, out_shape=shapes,
        interpret=plan.interpret, name="compress_attention_bwd", cost_estimate=cost_estimate(plan, backward=True),
    )
    return in_specs, common
