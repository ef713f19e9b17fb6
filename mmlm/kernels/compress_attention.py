"""Fused compression attention (LLaVA-Mini compressor core) in Pallas.

The compressor attends ``m`` (1 <= m <= M) learned queries over the ``N``
patch features of every image / video frame. Per batch element ``b``::

    xn  = LayerNorm(x[b])                      # (N, Dv), fp32, biased variance
    k   = (xn + pe_k) @ wk + bk                # (N, Dv)
    v   = xn @ wv + bv                         # (N, Dv)
    out = MHA(q, k, v, heads=H)                # (m, Dv), heads concatenated

``q`` arrives already projected (the caller applies LN_q, PE_q, wq, bq) and
the output projection is the caller's too.

The XLA path materialises ``k`` and ``v`` for every patch: 2 x B x N x Dv
values in HBM (for 64 video frames of 576 patches at Dv=1024 in bf16, 150 MB)
to produce only B x m x Dv outputs. The Pallas path fuses LayerNorm, the K/V
projections and a flash-attention style online softmax into one pass over
``x`` in blocks of ``block_n`` patches, so ``k``/``v`` only ever exist one
block at a time in on-chip memory. The backward pass is a second Pallas
kernel that recomputes LN/K/V per block from ``x`` and the saved per-row
logsumexp, and accumulates the gradients of every weight over blocks and
batch.

Two schedules share all the per-block math:

* ``"tpu"`` (Mosaic; also what interpret mode on CPU runs by default): grid
  ``(B, N/block_n)``; the N axis is a sequential ("arbitrary") reduction axis.
  The forward keeps the running max / sum / accumulator in VMEM scratch; the
  backward accumulates weight gradients in output blocks whose index never
  changes (so the whole backward grid is sequential). Every program loops
  over the heads, so ``x`` is read from HBM exactly once and each weight
  matrix once per call.
* ``"gpu"`` (Triton): GPU grid programs run concurrently and cannot carry a
  reduction, so the forward uses grid ``(B, N/block_n, H)`` and writes
  per-block softmax partials (max, sum, unnormalised output: B x nb x m x Dv
  floats, small because m is small) that XLA merges flash-decoding style;
  the backward uses grid ``(B, N/block_n)`` and ``atomic_add``s its weight
  gradient contributions. The contraction over Dv is chunked by ``block_d``
  to bound register / shared-memory tiles.

Padding (done by the wrapper with zeros, sliced off afterwards):

* N -> multiple of ``block_n``; padded keys get a score of -1e30 (probability
  exactly 0), so odd N (37, 577, ...) work. The default TPU ``block_n``
  divides N when it can (576 -> 288, 2304 -> 384), so the usual shapes are
  not padded: padding copies all the features in HBM.

Every ``pallas_call`` carries a ``pl.CostEstimate`` (FLOPs, exp count, HBM
bytes), so XLA's cost analysis and ``mmlm compile``'s roofline see the
kernel's work instead of zero.
* m -> multiple of 8 (TPU sublanes) or a power of two >= 16 (Triton ``dot``);
  padded query rows are zero and their cotangent is zero.
* dh (per-head width) -> multiple of 128 (TPU lanes) or a power of two >= 16;
  padded weight columns are zero, so padded k / v / out channels are zero.
* Dv (LayerNorm width) -> multiple of 128 (TPU) or of ``block_d`` (GPU);
  padded channels of x / ln_scale / ln_bias / weight rows are zero and the
  LayerNorm statistics divide by the true Dv and mask the padded channels.

Weights are re-laid out head-major, ``(H, Dv, dh)``, so a program selects a
head with a dynamic index on the untiled leading axis.

Numerics: LayerNorm, softmax and every accumulation are fp32; matmul operands
are in the compute dtype (fp32 for fp32 inputs, else the input dtype, e.g.
bf16 on the MXU / tensor cores). ``pe_k`` is rounded to the compute dtype in
both paths (halves its HBM traffic in bf16). The gradient w.r.t. ``pe_k`` is
returned as zeros by the Pallas path: it is a fixed sin-cos table in the
compressor, and computing it would need one more N x Dv accumulator per batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

_F32 = jnp.float32
# Finite "minus infinity" for masked scores: exp(_MASK - m) underflows to
# exactly 0 and never produces inf - inf = NaN.
_MASK = -1e30
_TPU_SUBLANE, _TPU_LANE = 8, 128
# Triton: every loaded tensor has power-of-two size and tl.dot wants >= 16.
_GPU_MIN_DIM = 16
_TARGETS = ("tpu", "gpu")
# Platform the program is compiled for, when it differs from the running backend (ahead-of-time
# compilation for a TPU topology on a CPU host); None = jax.default_backend().
_COMPILE_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("compile_platform", default=None)


@contextlib.contextmanager
def compile_platform(platform: str):
    """Traces inside this block target `platform` ("tpu", "gpu", "cpu") instead of the running backend.

    `mmlm compile` lowers the train step on a CPU host for a TPU topology: the
    kernel must then pick its Pallas TPU schedule, not the XLA path or
    interpret mode that a CPU backend would get.
    """
    token = _COMPILE_PLATFORM.set(platform)
    try:
        yield
    finally:
        _COMPILE_PLATFORM.reset(token)


def target_platform() -> str:
    """The platform being compiled for: the `compile_platform` override, else the default backend."""
    return _COMPILE_PLATFORM.get() or jax.default_backend()


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Matmul operand dtype: fp32 stays fp32, low precision stays low precision."""
    return jnp.dtype(_F32) if jnp.dtype(dtype) == jnp.dtype(_F32) else jnp.dtype(dtype)


def _default_block_n(n: int, candidates: tuple[int, ...]) -> int:
    """Block with the least padding of N, the largest on ties (fewest steps)."""
    return min(candidates, key=lambda c: (_round_up(n, c), -c))


def default_tpu_block_n(n: int) -> int:
    """The TPU schedule's default ``block_n`` for N patches.

    N <= 128: one block (N rounded up to 8 sublanes). Otherwise a multiple of 8
    in [128, 512] that divides N, so the wrapper never pads (copies) the
    features in HBM: the one whose lane padding (scores are (m, block_n) tiles
    of 128 lanes) wastes least, the largest on ties (576 -> 288, 2304 -> 384).
    When no such divisor exists, the one of 128/256/512 that pads N least.
    """
    small = _round_up(n, _TPU_SUBLANE)
    if small <= 128:
        return small
    divisors = [c for c in range(128, 513, _TPU_SUBLANE) if n % c == 0]
    if divisors:
        return min(divisors, key=lambda c: ((_round_up(c, _TPU_LANE) - c) / c, -c))
    return _default_block_n(n, (128, 256, 512))


# --------------------------------------------------------------------------
# XLA reference
# --------------------------------------------------------------------------


def _layernorm_f32(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """Standard LayerNorm over the last axis (biased variance), in fp32."""
    x = x.astype(_F32)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * scale.astype(_F32) + bias.astype(_F32)


def compress_attention_xla(
    x: jax.Array,
    q: jax.Array,
    ln_scale: jax.Array,
    ln_bias: jax.Array,
    wk: jax.Array,
    bk: jax.Array,
    wv: jax.Array,
    bv: jax.Array,
    pe_k: jax.Array,
    *,
    num_heads: int,
    eps: float = 1e-5,
) -> jax.Array:
    """Plain jnp implementation (and the numerical reference).

    Shapes: x (B, N, Dv), q (m, Dv), ln_* (Dv,), w* (Dv, Dv) in (in, out)
    layout, b* (Dv,), pe_k (N, Dv). Returns (B, m, Dv) in x.dtype.
    """
    bsz, n, dv = x.shape
    m = q.shape[0]
    dh = dv // num_heads
    cdt = _compute_dtype(x.dtype)
    xn = _layernorm_f32(x, ln_scale, ln_bias, eps)
    k_in = (xn + pe_k.astype(cdt).astype(_F32)).astype(cdt)
    k = jnp.einsum("bnd,de->bne", k_in, wk.astype(cdt), preferred_element_type=_F32) + bk.astype(_F32)
    v = jnp.einsum("bnd,de->bne", xn.astype(cdt), wv.astype(cdt), preferred_element_type=_F32) + bv.astype(_F32)
    qh = (q.astype(_F32) / math.sqrt(dh)).astype(cdt).reshape(m, num_heads, dh)
    kh = k.astype(cdt).reshape(bsz, n, num_heads, dh)
    vh = v.astype(cdt).reshape(bsz, n, num_heads, dh)
    s = jnp.einsum("mhd,bnhd->bhmn", qh, kh, preferred_element_type=_F32)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhmn,bnhd->bmhd", p.astype(cdt), vh, preferred_element_type=_F32)
    return o.reshape(bsz, m, dv).astype(x.dtype)


# --------------------------------------------------------------------------
# plan: static shapes, padding and block sizes
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call (hashable: a custom_vjp nondiff arg)."""

    batch: int
    n: int
    dv: int
    m: int
    heads: int
    dh: int
    n_pad: int
    dv_pad: int
    m_pad: int
    dh_pad: int
    block_n: int
    block_d: int
    target: str
    interpret: bool
    eps: float
    compute_dtype: str
    out_dtype: str

    @property
    def num_blocks(self) -> int:
        return self.n_pad // self.block_n

    @property
    def cdt(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.dh)


def _make_plan(
    x: jax.Array, q: jax.Array, num_heads: int, eps: float, block_n: int | None,
    block_d: int | None, target: str, interpret: bool,
) -> _Plan:
    """Validates shapes and picks padded sizes / blocks for the target."""
    bsz, n, dv = x.shape
    m = q.shape[0]
    dh = dv // num_heads
    if target == "tpu":
        m_pad = _round_up(m, _TPU_SUBLANE)
        dh_pad = _round_up(dh, _TPU_LANE)
        dv_pad = _round_up(dv, _TPU_LANE)
        # One Dv chunk: the whole (block_n, Dv) tile sits in VMEM anyway.
        if block_d is not None and block_d != dv_pad:
            raise ValueError(f"the tpu schedule uses block_d = padded Dv ({dv_pad}); got {block_d}")
        block_d = dv_pad
        if block_n is None:
            block_n = default_tpu_block_n(n)
        if block_n % _TPU_SUBLANE:
            raise ValueError(f"block_n must be a multiple of {_TPU_SUBLANE} on TPU, got {block_n}")
    elif target == "gpu":
        m_pad = _next_pow2(max(m, _GPU_MIN_DIM))
        dh_pad = _next_pow2(max(dh, _GPU_MIN_DIM))
        block_d = block_d or min(64, _next_pow2(max(dv, _GPU_MIN_DIM)))
        if not _is_pow2(block_d) or block_d < _GPU_MIN_DIM:
            raise ValueError(f"block_d must be a power of two >= {_GPU_MIN_DIM} on GPU, got {block_d}")
        dv_pad = _round_up(dv, block_d)
        block_n = block_n or 32
        if not _is_pow2(block_n) or block_n < _GPU_MIN_DIM:
            raise ValueError(f"block_n must be a power of two >= {_GPU_MIN_DIM} on GPU, got {block_n}")
    else:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    return _Plan(
        batch=bsz, n=n, dv=dv, m=m, heads=num_heads, dh=dh,
        n_pad=_round_up(n, block_n), dv_pad=dv_pad, m_pad=m_pad, dh_pad=dh_pad,
        block_n=block_n, block_d=block_d, target=target, interpret=interpret, eps=float(eps),
        compute_dtype=_compute_dtype(x.dtype).name, out_dtype=jnp.dtype(x.dtype).name,
    )


# --------------------------------------------------------------------------
# layout: padding and head-major re-layout (XLA, outside the kernels)
# --------------------------------------------------------------------------


class _Operands(NamedTuple):
    """Kernel operands, padded and head-major (shapes use padded sizes)."""

    x: jax.Array  # (B, Np, Dvp) input dtype
    pe: jax.Array  # (Np, Dvp) compute dtype
    ln_scale: jax.Array  # (1, Dvp) f32
    ln_bias: jax.Array  # (1, Dvp) f32
    q: jax.Array  # (H, mp, dhp) compute dtype, pre-scaled by 1/sqrt(dh)
    wk: jax.Array  # (H, Dvp, dhp) compute dtype
    bk: jax.Array  # (H, 1, dhp) f32
    wv: jax.Array  # (H, Dvp, dhp) compute dtype
    bv: jax.Array  # (H, 1, dhp) f32


def _pad_axis(a: jax.Array, axis: int, size: int) -> jax.Array:
    extra = size - a.shape[axis]
    if extra == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def _split_heads(a: jax.Array, plan: _Plan) -> jax.Array:
    """(..., Dv) -> (..., H, dhp): head h = channels [h*dh, (h+1)*dh), zero padded."""
    a = a.reshape(*a.shape[:-1], plan.heads, plan.dh)
    return _pad_axis(a, a.ndim - 1, plan.dh_pad)


def _merge_heads(a: jax.Array, plan: _Plan) -> jax.Array:
    """(..., H, dhp) -> (..., Dv): inverse of _split_heads."""
    a = a[..., : plan.dh]
    return a.reshape(*a.shape[:-2], plan.dv)


def _head_major_weight(w: jax.Array, plan: _Plan) -> jax.Array:
    """(Dv_in, Dv_out) -> (H, Dvp_in, dhp)."""
    w = _split_heads(_pad_axis(w, 0, plan.dv_pad), plan)  # (Dvp, H, dhp)
    return jnp.transpose(w, (1, 0, 2)).astype(plan.cdt)


def _weight_from_head_major(g: jax.Array, plan: _Plan) -> jax.Array:
    """(H, Dvp, dhp) -> (Dv, Dv): inverse layout of _head_major_weight."""
    return _merge_heads(jnp.transpose(g, (1, 0, 2)), plan)[: plan.dv]


def _prepare(plan: _Plan, x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k) -> _Operands:
    row = lambda a: _pad_axis(a.astype(_F32).reshape(1, plan.dv), 1, plan.dv_pad)
    qh = _split_heads((q.astype(_F32) * plan.scale), plan)  # (m, H, dhp)
    qh = _pad_axis(jnp.transpose(qh, (1, 0, 2)), 1, plan.m_pad).astype(plan.cdt)
    return _Operands(
        x=_pad_axis(_pad_axis(x, 1, plan.n_pad), 2, plan.dv_pad),
        pe=_pad_axis(_pad_axis(pe_k.astype(plan.cdt), 0, plan.n_pad), 1, plan.dv_pad),
        ln_scale=row(ln_scale),
        ln_bias=row(ln_bias),
        q=qh,
        wk=_head_major_weight(wk, plan),
        bk=_split_heads(bk.astype(_F32), plan)[:, None, :],
        wv=_head_major_weight(wv, plan),
        bv=_split_heads(bv.astype(_F32), plan)[:, None, :],
    )


# --------------------------------------------------------------------------
# in-kernel math, shared by both schedules (operates on one (block_n, Dvp) tile)
# --------------------------------------------------------------------------


def _precision(a: jax.Array):
    # fp32 operands: ask for true fp32 (TPU otherwise uses one bf16 pass).
    return jax.lax.Precision.HIGHEST if a.dtype == _F32 else None


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b with fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a), preferred_element_type=_F32)


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T with fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a), preferred_element_type=_F32)


def _dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a.T @ b with fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_precision(a), preferred_element_type=_F32)


def _chunks(plan: _Plan) -> list[slice]:
    """Static channel chunks of the (padded) Dv axis."""
    return [slice(c, c + plan.block_d) for c in range(0, plan.dv_pad, plan.block_d)]


def _channel_mask(cols: slice, plan: _Plan) -> jax.Array | None:
    """(1, block_d) bool mask of real (unpadded) channels, None if no padding."""
    if cols.stop <= plan.dv:
        return None
    ids = cols.start + jax.lax.broadcasted_iota(jnp.int32, (1, plan.block_d), 1)
    return ids < plan.dv


def _key_mask(j: jax.Array, plan: _Plan) -> jax.Array:
    """(1, block_n) bool mask of real (unpadded) keys in N-block j."""
    ids = j * plan.block_n + jax.lax.broadcasted_iota(jnp.int32, (1, plan.block_n), 1)
    return ids < plan.n


def _row_stats(x_ref, plan: _Plan) -> tuple[jax.Array, jax.Array]:
    """LayerNorm mean and 1/std per row, (block_n, 1) each, two-pass (stable)."""
    total = jnp.zeros((plan.block_n, 1), _F32)
    for cols in _chunks(plan):
        total += jnp.sum(x_ref[:, cols].astype(_F32), axis=1, keepdims=True)
    mu = total / plan.dv
    sq = jnp.zeros((plan.block_n, 1), _F32)
    for cols in _chunks(plan):
        xc = x_ref[:, cols].astype(_F32) - mu
        mask = _channel_mask(cols, plan)
        if mask is not None:
            xc = jnp.where(mask, xc, 0.0)
        sq += jnp.sum(xc * xc, axis=1, keepdims=True)
    return mu, jax.lax.rsqrt(sq / plan.dv + plan.eps)


def _normalize(x_ref, g_ref, b_ref, cols: slice, mu, rstd, plan: _Plan) -> tuple[jax.Array, jax.Array]:
    """(xhat, xn) of one channel chunk, fp32 (block_n, block_d); padded channels are 0."""
    xhat = (x_ref[:, cols].astype(_F32) - mu) * rstd
    mask = _channel_mask(cols, plan)
    if mask is not None:
        xhat = jnp.where(mask, xhat, 0.0)
    return xhat, xhat * g_ref[:, cols] + b_ref[:, cols]


def _project_head(refs: "_InRefs", h, mu, rstd, plan: _Plan) -> tuple[jax.Array, jax.Array]:
    """k, v of head h for the tile: fp32 (block_n, dhp) each."""
    k = jnp.zeros((plan.block_n, plan.dh_pad), _F32)
    v = jnp.zeros((plan.block_n, plan.dh_pad), _F32)
    for cols in _chunks(plan):
        _, xn = _normalize(refs.x, refs.ln_scale, refs.ln_bias, cols, mu, rstd, plan)
        k_in = (xn + refs.pe[:, cols].astype(_F32)).astype(plan.cdt)
        k += _dot(k_in, refs.wk[h, cols, :])
        v += _dot(xn.astype(plan.cdt), refs.wv[h, cols, :])
    return k + refs.bk[h], v + refs.bv[h]


def _scores(q: jax.Array, k: jax.Array, valid: jax.Array, plan: _Plan) -> jax.Array:
    """Masked scaled scores (mp, block_n), fp32 (q is pre-scaled)."""
    return jnp.where(valid, _dot_nt(q, k.astype(plan.cdt)), _MASK)


def _block_softmax(q, k, v, valid, plan: _Plan) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Block-local softmax partials: row max (mp,1), row sum (mp,1), unnormalised out (mp,dhp)."""
    s = _scores(q, k, valid, plan)
    m_blk = jnp.max(s, axis=1, keepdims=True)
    e = jnp.exp(s - m_blk)
    return m_blk, jnp.sum(e, axis=1, keepdims=True), _dot(e.astype(plan.cdt), v.astype(plan.cdt))


class _InRefs(NamedTuple):
    """Kernel input refs in _Operands order (x, pe tiles; everything else whole)."""

    x: object
    pe: object
    ln_scale: object
    ln_bias: object
    q: object
    wk: object
    bk: object
    wv: object
    bv: object


def _operand_specs(plan: _Plan, index_map: Callable) -> list[pl.BlockSpec]:
    """BlockSpecs for _Operands; index_map(b, j) gives the grid's batch/block ids."""
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


# --------------------------------------------------------------------------
# compiler params
# --------------------------------------------------------------------------


def _tile_bytes(plan: _Plan, backward: bool) -> int:
    """Rough VMEM footprint of one TPU grid step (double-buffered blocks + temporaries)."""
    cdt = plan.cdt.itemsize
    bn, dvp, hdh = plan.block_n, plan.dv_pad, plan.heads * plan.dh_pad
    blocks = bn * dvp * (4 + cdt) + 2 * dvp * hdh * cdt + plan.m_pad * hdh * (cdt + 4)
    temps = 4 * bn * dvp * 4 + 6 * bn * plan.dh_pad * 4 + 4 * plan.m_pad * bn * 4
    if backward:
        blocks += bn * dvp * 4 + 2 * dvp * hdh * 4 + plan.m_pad * hdh * (cdt + 4)
    return 2 * blocks + temps


def _compiler_params(plan: _Plan, semantics: tuple[str, ...], backward: bool):
    if plan.target == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    from jax.experimental.pallas import tpu as pltpu

    limit = max(32 << 20, int(1.5 * _tile_bytes(plan, backward)))
    if not plan.interpret and jax.default_backend() == "tpu":
        limit = min(limit, int(0.9 * pltpu.get_tpu_info().vmem_capacity_bytes))
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _cost_estimate(plan: _Plan, backward: bool) -> pl.CostEstimate:
    """FLOPs / exp / HBM bytes of one kernel call (padded sizes: the work the kernel does).

    Without it XLA's cost analysis counts a Pallas call as zero work. Per batch
    element, with P = 2 x Np x Dvp x H x dhp (one K or V projection) and
    A = 2 x mp x Np x H x dhp (one of the attention matmuls):
    forward 2P + 2A (K, V; scores, A V); backward 6P + 5A (K, V recomputed,
    dWk, dWv, dxn through both; scores recomputed, dV, dP, dK, dQ).
    """
    b, hd = plan.batch, plan.heads * plan.dh_pad
    proj = 2 * plan.n_pad * plan.dv_pad * hd
    attn = 2 * plan.m_pad * plan.n_pad * hd
    cdt = plan.cdt.itemsize
    x_bytes = b * plan.n_pad * plan.dv_pad * jnp.dtype(plan.out_dtype).itemsize
    weights = 2 * plan.dv_pad * hd * cdt + plan.n_pad * plan.dv_pad * cdt + plan.m_pad * hd * cdt
    per_b_out = plan.m_pad * hd * jnp.dtype(plan.out_dtype).itemsize + plan.heads * plan.m_pad * 4
    if not backward:
        flops = b * (2 * proj + 2 * attn)
        nbytes = x_bytes + weights + b * per_b_out
    else:
        flops = b * (6 * proj + 5 * attn)
        dx = b * plan.n_pad * plan.dv_pad * 4
        grads = (2 * plan.dv_pad * hd + plan.m_pad * hd + 2 * hd + 2 * plan.dv_pad) * 4
        nbytes = x_bytes + weights + dx + grads + b * (plan.m_pad * hd * cdt + 2 * plan.heads * plan.m_pad * 4)
    exps = b * plan.heads * plan.m_pad * plan.n_pad + b * plan.n_pad  # softmax exp, LayerNorm rsqrt
    return pl.CostEstimate(flops=int(flops), transcendentals=int(exps), bytes_accessed=int(nbytes))


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------


def _fwd_kernel_tpu(*refs, plan: _Plan):
    """Grid (B, nb): all heads of one tile; online softmax across the nb axis."""
    ins = _InRefs(*refs[:9])
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[9:]
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    mu, rstd = _row_stats(ins.x, plan)
    valid = _key_mask(j, plan)

    def head(h, carry):
        k, v = _project_head(ins, h, mu, rstd, plan)
        m_blk, l_blk, acc_blk = _block_softmax(ins.q[h], k, v, valid, plan)
        m_old = m_sc[h]
        m_new = jnp.maximum(m_old, m_blk)
        a_old, a_blk = jnp.exp(m_old - m_new), jnp.exp(m_blk - m_new)
        m_sc[h] = m_new
        l_sc[h] = a_old * l_sc[h] + a_blk * l_blk
        acc_sc[h] = a_old * acc_sc[h] + a_blk * acc_blk
        return carry

    jax.lax.fori_loop(0, plan.heads, head, 0)

    @pl.when(j == plan.num_blocks - 1)
    def _finish():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])


def _forward_tpu(plan: _Plan, ops: _Operands) -> tuple[jax.Array, jax.Array]:
    from jax.experimental.pallas import tpu as pltpu

    hm = (plan.heads, plan.m_pad)
    return pl.pallas_call(
        functools.partial(_fwd_kernel_tpu, plan=plan),
        grid=(plan.batch, plan.num_blocks),
        in_specs=_operand_specs(plan, lambda b, j: (b, j)),
        out_specs=[
            pl.BlockSpec((None, *hm, plan.dh_pad), lambda b, j: (b, 0, 0, 0)),
            pl.BlockSpec((None, *hm, 1), lambda b, j: (b, 0, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((plan.batch, *hm, plan.dh_pad), plan.out_dtype),
            jax.ShapeDtypeStruct((plan.batch, *hm, 1), _F32),
        ],
        scratch_shapes=[pltpu.VMEM((*hm, 1), _F32), pltpu.VMEM((*hm, 1), _F32), pltpu.VMEM((*hm, plan.dh_pad), _F32)],
        compiler_params=_compiler_params(plan, ("parallel", "arbitrary"), backward=False),
        interpret=plan.interpret,
        cost_estimate=_cost_estimate(plan, backward=False),
        name="compress_attention_fwd",
    )(*ops)


def _fwd_kernel_gpu(*refs, plan: _Plan):
    """Grid (B, nb, H): block-local softmax partials of one head and one tile."""
    ins = _InRefs(*refs[:9])
    m_ref, l_ref, acc_ref = refs[9:]
    j, h = pl.program_id(1), pl.program_id(2)
    mu, rstd = _row_stats(ins.x, plan)
    k, v = _project_head(ins, h, mu, rstd, plan)
    m_blk, l_blk, acc_blk = _block_softmax(ins.q[h], k, v, _key_mask(j, plan), plan)
    m_ref[...] = m_blk
    l_ref[...] = l_blk
    acc_ref[...] = acc_blk


def _forward_gpu(plan: _Plan, ops: _Operands) -> tuple[jax.Array, jax.Array]:
    part = (plan.batch, plan.num_blocks, plan.heads, plan.m_pad)
    spec = lambda last: pl.BlockSpec((None, None, None, plan.m_pad, last), lambda b, j, h: (b, j, h, 0, 0))
    m_p, l_p, acc_p = pl.pallas_call(
        functools.partial(_fwd_kernel_gpu, plan=plan),
        grid=(plan.batch, plan.num_blocks, plan.heads),
        in_specs=_operand_specs(plan, lambda b, j, h: (b, j)),
        out_specs=[spec(1), spec(1), spec(plan.dh_pad)],
        out_shape=[
            jax.ShapeDtypeStruct((*part, 1), _F32),
            jax.ShapeDtypeStruct((*part, 1), _F32),
            jax.ShapeDtypeStruct((*part, plan.dh_pad), _F32),
        ],
        compiler_params=_compiler_params(plan, (), backward=False),
        interpret=plan.interpret,
        cost_estimate=_cost_estimate(plan, backward=False),
        name="compress_attention_fwd_split",
    )(*ops)
    # Flash-decoding merge of the per-block partials (tiny: B x nb x H x mp x dhp).
    m_all = jnp.max(m_p, axis=1, keepdims=True)
    w = jnp.exp(m_p - m_all)
    l_all = jnp.sum(w * l_p, axis=1)
    o = jnp.sum(w * acc_p, axis=1) / l_all
    return o.astype(plan.out_dtype), m_all[:, 0] + jnp.log(l_all)


def _forward(plan: _Plan, ops: _Operands) -> tuple[jax.Array, jax.Array]:
    """Returns o (B, H, mp, dhp) in the output dtype and lse (B, H, mp, 1) fp32."""
    return (_forward_tpu if plan.target == "tpu" else _forward_gpu)(plan, ops)


# --------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------
#
# Per head, with p = exp(s - lse) the saved softmax and Delta = rowsum(dO * O):
#   dV = p^T dO            dP = dO V^T          dS = p * (dP - Delta)
#   dQs += dS K            dK = dS^T Qs         (Qs = Q / sqrt(dh))
# Through k = (xn + pe) Wk + bk and v = xn Wv + bv:
#   dWk += (xn + pe)^T dK  dbk += colsum(dK)   dWv += xn^T dV   dbv += colsum(dV)
#   dxn  = sum_h dK Wk_h^T + dV Wv_h^T
# Through xn = xhat * g + beta, xhat = (x - mu) * rstd (means over the true Dv):
#   dg += colsum(dxn * xhat)  dbeta += colsum(dxn)
#   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dxn * g


class _GradRefs(NamedTuple):
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


def _bwd_tile(ins: _InRefs, do_ref, lse_ref, delta_ref, out: _GradRefs, j, accumulate: Accumulate, plan: _Plan):
    """All gradient contributions of one (batch element, N-block) tile."""
    cdt = plan.cdt
    chunks = _chunks(plan)
    mu, rstd = _row_stats(ins.x, plan)
    valid = _key_mask(j, plan)
    for cols in chunks:  # dx tile doubles as the dxn accumulator (fp32)
        out.dx[:, cols] = jnp.zeros((plan.block_n, plan.block_d), _F32)

    def head(h, carry):
        q, do = ins.q[h], do_ref[h]
        k, v = _project_head(ins, h, mu, rstd, plan)
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
            k_in = (xn + ins.pe[:, cols].astype(_F32)).astype(cdt)
            accumulate(out.dwk, (h, cols, slice(None)), _dot_tn(k_in, dk))
            accumulate(out.dwv, (h, cols, slice(None)), _dot_tn(xn.astype(cdt), dv))
            dxn = _dot_nt(dk, ins.wk[h, cols, :]) + _dot_nt(dv, ins.wv[h, cols, :])
            out.dx[:, cols] = out.dx[:, cols] + dxn
        return carry

    jax.lax.fori_loop(0, plan.heads, head, 0)
    _layernorm_bwd(ins, out, mu, rstd, accumulate, plan)


def _layernorm_bwd(ins: _InRefs, out: _GradRefs, mu, rstd, accumulate: Accumulate, plan: _Plan):
    """Turns the dxn held in out.dx into dx; accumulates dg and dbeta."""
    mean_dxhat = jnp.zeros((plan.block_n, 1), _F32)
    mean_dxhat_xhat = jnp.zeros((plan.block_n, 1), _F32)
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


def _accumulate_inplace(ref, idx: tuple, value: jax.Array) -> None:
    ref[idx] = ref[idx] + value


def _bwd_kernel_tpu(*refs, plan: _Plan):
    """Grid (B, nb), fully sequential: accumulators stay resident in VMEM."""
    ins = _InRefs(*refs[:9])
    do_ref, lse_ref, delta_ref = refs[9:12]
    out = _GradRefs(*refs[12:])
    b, j = pl.program_id(0), pl.program_id(1)

    @pl.when(jnp.logical_and(b == 0, j == 0))
    def _init():
        for acc in out[1:]:
            acc[...] = jnp.zeros(acc.shape, _F32)

    _bwd_tile(ins, do_ref, lse_ref, delta_ref, out, j, _accumulate_inplace, plan)


def _bwd_kernel_gpu(*refs, plan: _Plan):
    """Grid (B, nb), concurrent programs: accumulators are zero-initialised aliases, added atomically."""
    from jax.experimental.pallas import triton as pltriton

    ins = _InRefs(*refs[:9])
    do_ref, lse_ref, delta_ref = refs[9:12]
    out = _GradRefs(*refs[12 + 7 :])  # skip the 7 zero inputs aliased to the accumulators
    atomic = lambda ref, idx, value: pltriton.atomic_add(ref, idx, value)
    _bwd_tile(ins, do_ref, lse_ref, delta_ref, out, pl.program_id(1), atomic, plan)


def _grad_shapes(plan: _Plan) -> list[jax.ShapeDtypeStruct]:
    hd = (plan.heads, plan.dv_pad, plan.dh_pad)
    hb = (plan.heads, 1, plan.dh_pad)
    shapes = [(plan.batch, plan.n_pad, plan.dv_pad), (plan.heads, plan.m_pad, plan.dh_pad), hd, hb, hd, hb,
              (1, plan.dv_pad), (1, plan.dv_pad)]
    return [jax.ShapeDtypeStruct(s, _F32) for s in shapes]


def _backward_call(plan: _Plan, ops: _Operands, do: jax.Array, lse: jax.Array, delta: jax.Array) -> list[jax.Array]:
    """Runs the backward kernel; returns padded fp32 grads in _GradRefs order."""
    hm = (plan.heads, plan.m_pad)
    per_b = lambda last: pl.BlockSpec((None, *hm, last), lambda b, j: (b, 0, 0, 0))
    in_specs = _operand_specs(plan, lambda b, j: (b, j)) + [per_b(plan.dh_pad), per_b(1), per_b(1)]
    shapes = _grad_shapes(plan)
    whole = lambda s: pl.BlockSpec(s.shape, lambda b, j: (0,) * len(s.shape))
    out_specs = [pl.BlockSpec((None, plan.block_n, plan.dv_pad), lambda b, j: (b, j, 0))]
    out_specs += [whole(s) for s in shapes[1:]]
    args = [*ops, do, lse, delta]
    common = dict(
        grid=(plan.batch, plan.num_blocks), out_specs=out_specs, out_shape=shapes,
        interpret=plan.interpret, name="compress_attention_bwd", cost_estimate=_cost_estimate(plan, backward=True),
    )
    if plan.target == "tpu":
        return pl.pallas_call(
            functools.partial(_bwd_kernel_tpu, plan=plan), in_specs=in_specs,
            compiler_params=_compiler_params(plan, ("arbitrary", "arbitrary"), backward=True), **common,
        )(*args)
    zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes[1:]]
    first = len(args)
    return pl.pallas_call(
        functools.partial(_bwd_kernel_gpu, plan=plan), in_specs=in_specs + [whole(s) for s in shapes[1:]],
        input_output_aliases={first + i: 1 + i for i in range(len(zeros))},
        compiler_params=_compiler_params(plan, (), backward=True), **common,
    )(*args, *zeros)


# --------------------------------------------------------------------------
# custom_vjp glue
# --------------------------------------------------------------------------


def _outputs(plan: _Plan, o: jax.Array) -> jax.Array:
    """(B, H, mp, dhp) -> (B, m, Dv)."""
    return _merge_heads(jnp.transpose(o[:, :, : plan.m], (0, 2, 1, 3)), plan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(plan: _Plan, x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k) -> jax.Array:
    o, _ = _forward(plan, _prepare(plan, x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k))
    return _outputs(plan, o)


def _fused_fwd(plan: _Plan, x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k):
    args = (x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k)
    o, lse = _forward(plan, _prepare(plan, *args))
    return _outputs(plan, o), (args, o, lse)


def _fused_bwd(plan: _Plan, res, dout: jax.Array):
    args, o, lse = res
    x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k = args
    ops = _prepare(plan, *args)
    do = _pad_axis(jnp.transpose(_split_heads(dout.astype(_F32), plan), (0, 2, 1, 3)), 2, plan.m_pad)
    delta = jnp.sum(do * o.astype(_F32), axis=-1, keepdims=True)  # (B, H, mp, 1)
    dx, dq, dwk, dbk, dwv, dbv, dg, dbeta = _backward_call(plan, ops, do.astype(plan.cdt), lse, delta)
    dq = _merge_heads(jnp.transpose(dq[:, : plan.m], (1, 0, 2)), plan) * plan.scale
    vec = lambda a: _merge_heads(a[:, 0], plan)
    grads = (
        dx[:, : plan.n, : plan.dv], dq, dg[0, : plan.dv], dbeta[0, : plan.dv],
        _weight_from_head_major(dwk, plan), vec(dbk), _weight_from_head_major(dwv, plan), vec(dbv),
    )
    grads = tuple(g.astype(a.dtype) for g, a in zip(grads, args))
    return (*grads, jnp.zeros_like(pe_k))


_fused.defvjp(_fused_fwd, _fused_bwd)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def _check_shapes(x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k, num_heads: int) -> None:
    if x.ndim != 3:
        raise ValueError(f"x must be (B, N, Dv), got {x.shape}")
    _, n, dv = x.shape
    if dv % num_heads:
        raise ValueError(f"Dv={dv} is not divisible by num_heads={num_heads}")
    expected = {"q": (q.shape[0], dv), "ln_scale": (dv,), "ln_bias": (dv,), "wk": (dv, dv), "bk": (dv,),
                "wv": (dv, dv), "bv": (dv,), "pe_k": (n, dv)}
    got = {"q": q.shape, "ln_scale": ln_scale.shape, "ln_bias": ln_bias.shape, "wk": wk.shape, "bk": bk.shape,
           "wv": wv.shape, "bv": bv.shape, "pe_k": pe_k.shape}
    bad = {k: (got[k], v) for k, v in expected.items() if tuple(got[k]) != v}
    if q.ndim != 2 or q.shape[0] < 1 or bad:
        raise ValueError(f"shape mismatch (got, expected): {bad or {'q': q.shape}}")


def _over_batch_shards(fn: Callable[..., jax.Array], x: jax.Array, *rest: jax.Array) -> jax.Array:
    """Runs `fn(x, *rest)` per shard of the batch axes of the current (abstract) mesh.

    A Mosaic kernel has no automatic (GSPMD) partitioning rule, so under a
    sharded jit it must sit in a `shard_map`: x is split over the mesh's
    data-parallel axes (those of `mmlm.sharding.BATCH_AXES` present with size
    > 1), every other operand is replicated, and shard_map's transpose sums
    the weight gradients over the shards. Without a mesh in context (set by
    `mmlm.train.step`), or on one device, `fn` runs as is. A batch the
    shards do not divide runs whole on every device.
    """
    from mmlm.sharding import BATCH_AXES

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(x, *rest)
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if axes and x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    spec = P(axes) if axes else P()
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) + (P(),) * len(rest), out_specs=spec,
                         check_vma=False)(x, *rest)


def pallas_compress_attention(
    x: jax.Array, q: jax.Array, ln_scale: jax.Array, ln_bias: jax.Array, wk: jax.Array, bk: jax.Array,
    wv: jax.Array, bv: jax.Array, pe_k: jax.Array, *, num_heads: int, eps: float = 1e-5,
    block_n: int | None = None, block_d: int | None = None, target: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The fused Pallas kernel with an explicit schedule (see module docstring).

    ``target``: "tpu" or "gpu" schedule; None picks "gpu" on a GPU backend and
    "tpu" otherwise (so interpret mode on CPU runs the TPU schedule).
    ``block_d`` (GPU schedule only): Dv chunk of the in-kernel contraction.
    Shapes as in :func:`compress_attention`; differentiable (custom VJP).
    """
    _check_shapes(x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k, num_heads)
    backend = target_platform()
    target = target or ("gpu" if backend == "gpu" else "tpu")
    interpret = backend == "cpu" if interpret is None else interpret

    def run(x, *weights):
        plan = _make_plan(x, weights[0], num_heads, eps, block_n, block_d, target, interpret)
        return _fused(plan, x, *weights)

    return _over_batch_shards(run, x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k)


def resolve_impl(impl: str) -> str:
    """'auto' -> 'pallas' on GPU/TPU targets, 'xla' on CPU (interpret mode is for correctness only).

    The target is `target_platform()`: the running backend, or the platform of `compile_platform`.
    """
    if impl not in ("auto", "pallas", "xla"):
        raise ValueError(f"impl must be 'auto', 'pallas' or 'xla', got {impl!r}")
    if impl == "auto":
        return "pallas" if target_platform() in ("gpu", "tpu") else "xla"
    return impl


def compress_attention(
    x: jax.Array,
    q: jax.Array,
    ln_scale: jax.Array,
    ln_bias: jax.Array,
    wk: jax.Array,
    bk: jax.Array,
    wv: jax.Array,
    bv: jax.Array,
    pe_k: jax.Array,
    *,
    num_heads: int,
    eps: float = 1e-5,
    impl: str = "auto",
    block_n: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Multi-head attention of shared queries over LayerNorm-ed, projected patches.

    Args:
      x: (B, N, Dv) raw vision features (B = images or flattened video frames).
      q: (m, Dv) already-projected queries, shared by the batch.
      ln_scale, ln_bias: (Dv,) LayerNorm parameters (eps ``eps``, biased variance).
      wk, wv: (Dv, Dv) key / value projections, (in, out) layout; bk, bv: (Dv,).
      pe_k: (N, Dv) fixed key position table (added to LN(x) for keys only).
      num_heads: H; head h uses channels [h*Dv/H, (h+1)*Dv/H).
      impl: "xla" (reference), "pallas" (fused kernel) or "auto" (Pallas on
        GPU/TPU, XLA on CPU).
      block_n: patches per kernel step (TPU: multiple of 8, default
        `default_tpu_block_n(N)`, a divisor of N when one fits; GPU: power of
        two >= 16, default 32).
      interpret: Pallas interpret mode; None = exactly when the target
        platform (`target_platform()`) is CPU.

    Returns:
      (B, m, Dv) in x.dtype: per-head softmax(q k^T / sqrt(Dv/H)) v, heads
      concatenated, before the caller's output projection.

    Differentiable w.r.t. every argument; the Pallas path returns a zero
    gradient for ``pe_k`` (a fixed table), the XLA path the true one.
    """
    if resolve_impl(impl) == "xla":
        _check_shapes(x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k, num_heads)
        return compress_attention_xla(x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k, num_heads=num_heads, eps=eps)
    return pallas_compress_attention(
        x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k, num_heads=num_heads, eps=eps, block_n=block_n,
        interpret=interpret,
    )
