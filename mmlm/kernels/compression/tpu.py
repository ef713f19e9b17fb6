"""TPU (Mosaic) schedule: forward and backward kernels, their pallas_calls, compiler params and VMEM sizing.

Grid ``(B, N/block_n)``; the N axis is a sequential ("arbitrary") reduction
axis. The forward keeps the running max / sum / accumulator in VMEM scratch;
the backward accumulates weight gradients in output blocks whose index never
changes (so the whole backward grid is sequential). Every program loops over
the heads, so ``x`` is read from HBM exactly once and each weight matrix once
per call. Interpret mode on CPU runs this schedule by default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mmlm.kernels.compression.blocks import (
    GradRefs, InRefs, backward_call_args, block_softmax, bwd_tile, key_mask, operand_specs, project_head, row_stats,
)
from mmlm.kernels.compression.cost import cost_estimate
from mmlm.kernels.compression.plan import F32, Operands, Plan


def _tile_bytes(plan: Plan, backward: bool) -> int:
    """Rough VMEM footprint of one TPU grid step (double-buffered blocks + temporaries)."""
    cdt = plan.cdt.itemsize
    bn, dvp, hdh = plan.block_n, plan.dv_pad, plan.heads * plan.dh_pad
    blocks = bn * dvp * (4 + cdt) + 2 * dvp * hdh * cdt + plan.m_pad * hdh * (cdt + 4)
    temps = 4 * bn * dvp * 4 + 6 * bn * plan.dh_pad * 4 + 4 * plan.m_pad * bn * 4
    if backward:
        blocks += bn * dvp * 4 + 2 * dvp * hdh * 4 + plan.m_pad * hdh * (cdt + 4)
    return 2 * blocks + temps


def _compiler_params(plan: Plan, semantics: tuple[str, ...], backward: bool):
    from jax.experimental.pallas import tpu as pltpu

    limit = max(32 << 20, int(1.5 * _tile_bytes(plan, backward)))
    if not plan.interpret and jax.default_backend() == "tpu":
        limit = min(limit, int(0.9 * pltpu.get_tpu_info().vmem_capacity_bytes))
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _fwd_kernel_tpu(*refs, plan: Plan):
    """Grid (B, nb): all heads of one tile; online softmax across the nb axis."""
    ins = InRefs(*refs[:9])
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[9:]
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, F32)
        l_sc[...] = jnp.zeros(l_sc.shape, F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

    mu, rstd = row_stats(ins.x, plan)
    valid = key_mask(j, plan)

    def head(h, carry):
        k, v = project_head(ins, h, mu, rstd, plan)
        m_blk, l_blk, acc_blk = block_softmax(ins.q[h], k, v, valid, plan)
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


def forward_tpu(plan: Plan, ops: Operands) -> tuple[jax.Array, jax.Array]:
    from jax.experimental.pallas import tpu as pltpu

    hm = (plan.heads, plan.m_pad)
    return pl.pallas_call(
        functools.partial(_fwd_kernel_tpu, plan=plan),
        grid=(plan.batch, plan.num_blocks),
        in_specs=operand_specs(plan, lambda b, j: (b, j)),
        out_specs=[
            pl.BlockSpec((None, *hm, plan.dh_pad), lambda b, j: (b, 0, 0, 0)),
            pl.BlockSpec((None, *hm, 1), lambda b, j: (b, 0, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((plan.batch, *hm, plan.dh_pad), plan.out_dtype),
            jax.ShapeDtypeStruct((plan.batch, *hm, 1), F32),
        ],
        scratch_shapes=[pltpu.VMEM((*hm, 1), F32), pltpu.VMEM((*hm, 1), F32), pltpu.VMEM((*hm, plan.dh_pad), F32)],
        compiler_params=_compiler_params(plan, ("parallel", "arbitrary"), backward=False),
        interpret=plan.interpret,
        cost_estimate=cost_estimate(plan, backward=False),
        name="compress_attention_fwd",
    )(*ops)


def _accumulate_inplace(ref, idx: tuple, value: jax.Array) -> None:
    ref[idx] = ref[idx] + value


def _bwd_kernel_tpu(*refs, plan: Plan):
    """Grid (B, nb), fully sequential: accumulators stay resident in VMEM."""
    ins = InRefs(*refs[:9])
    do_ref, lse_ref, delta_ref = refs[9:12]
    out = GradRefs(*refs[12:])
    b, j = pl.program_id(0), pl.program_id(1)

    @pl.when(jnp.logical_and(b == 0, j == 0))
    def _init():
        for acc in out[1:]:
            acc[...] = jnp.zeros(acc.shape, F32)

    bwd_tile(ins, do_ref, lse_ref, delta_ref, out, j, _accumulate_inplace, plan)


def backward_tpu(plan: Plan, ops: Operands, do: jax.Array, lse: jax.Array, delta: jax.Array) -> list[jax.Array]:
    """Runs the backward kernel; returns padded fp32 grads in GradRefs order."""
    in_specs, common = backward_call_args(plan)
    return pl.pallas_call(
        functools.partial(_bwd_kernel_tpu, plan=plan), in_specs=in_specs,
        compiler_params=_compiler_params(plan, ("arbitrary", "arbitrary"), backward=True), **common,
    )(*ops, do, lse, delta)
