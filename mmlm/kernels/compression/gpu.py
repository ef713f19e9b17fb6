"""GPU (Triton) schedule: forward and backward kernels and their pallas_calls.

GPU grid programs run concurrently and cannot carry a reduction, so the
forward uses grid ``(B, N/block_n, H)`` and writes per-block softmax partials
(max, sum, unnormalised output: B x nb x m x Dv floats, small because m is
small) that XLA merges flash-decoding style; the backward uses grid
``(B, N/block_n)`` and ``atomic_add``s its weight gradient contributions. The
contraction over Dv is chunked by ``block_d`` to bound register /
shared-memory tiles.
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


def _compiler_params():
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _fwd_kernel_gpu(*refs, plan: Plan):
    """Grid (B, nb, H): block-local softmax partials of one head and one tile."""
    ins = InRefs(*refs[:9])
    m_ref, l_ref, acc_ref = refs[9:]
    j, h = pl.program_id(1), pl.program_id(2)
    mu, rstd = row_stats(ins.x, plan)
    k, v = project_head(ins, h, mu, rstd, plan)
    m_blk, l_blk, acc_blk = block_softmax(ins.q[h], k, v, key_mask(j, plan), plan)
    m_ref[...] = m_blk
    l_ref[...] = l_blk
    acc_ref[...] = acc_blk


def forward_gpu(plan: Plan, ops: Operands) -> tuple[jax.Array, jax.Array]:
    part = (plan.batch, plan.num_blocks, plan.heads, plan.m_pad)
    spec = lambda last: pl.BlockSpec((None, None, None, plan.m_pad, last), lambda b, j, h: (b, j, h, 0, 0))
    m_p, l_p, acc_p = pl.pallas_call(
        functools.partial(_fwd_kernel_gpu, plan=plan),
        grid=(plan.batch, plan.num_blocks, plan.heads),
        in_specs=operand_specs(plan, lambda b, j, h: (b, j)),
        out_specs=[spec(1), spec(1), spec(plan.dh_pad)],
        out_shape=[
            jax.ShapeDtypeStruct((*part, 1), F32),
            jax.ShapeDtypeStruct((*part, 1), F32),
            jax.ShapeDtypeStruct((*part, plan.dh_pad), F32),
        ],
        compiler_params=_compiler_params(),
        interpret=plan.interpret,
        cost_estimate=cost_estimate(plan, backward=False),
        name="compress_attention_fwd_split",
    )(*ops)
    # Flash-decoding merge of the per-block partials (tiny: B x nb x H x mp x dhp).
    m_all = jnp.max(m_p, axis=1, keepdims=True)
    w = jnp.exp(m_p - m_all)
    l_all = jnp.sum(w * l_p, axis=1)
    o = jnp.sum(w * acc_p, axis=1) / l_all
    return o.astype(plan.out_dtype), m_all[:, 0] + jnp.log(l_all)


def _bwd_kernel_gpu(*refs, plan: Plan):
    """Grid (B, nb), concurrent programs: accumulators are zero-initialised aliases, added atomically."""
    from jax.experimental.pallas import triton as pltriton

    ins = InRefs(*refs[:9])
    do_ref, lse_ref, delta_ref = refs[9:12]
    out = GradRefs(*refs[12 + 7 :])  # skip the 7 zero inputs aliased to the accumulators
    atomic = lambda ref, idx, value: pltriton.atomic_add(ref, idx, value)
    bwd_tile(ins, do_ref, lse_ref, delta_ref, out, pl.program_id(1), atomic, plan)


def backward_gpu(plan: Plan, ops: Operands, do: jax.Array, lse: jax.Array, delta: jax.Array) -> list[jax.Array]:
    """Runs the backward kernel; returns padded fp32 grads in GradRefs order."""
    in_specs, common = backward_call_args(plan)
    args = [*ops, do, lse, delta]
    zeros = [jnp.zeros(s.shape, s.dtype) for s in common["out_shape"][1:]]
    first = len(args)
    return pl.pallas_call(
        functools.partial(_bwd_kernel_gpu, plan=plan),
        in_specs=in_specs + common["out_specs"][1:],  # the zero inputs, laid out like the accumulators they alias
        input_output_aliases={first + i: 1 + i for i in range(len(zeros))},
        compiler_params=_compiler_params(), **common,
    )(*args, *zeros)
