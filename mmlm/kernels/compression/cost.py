"""Cost of one kernel call (``pl.CostEstimate``), so XLA's cost analysis and `mmlm compile` see its work."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

from mmlm.kernels.compression.plan import Plan


def cost_estimate(plan: Plan, backward: bool) -> pl.CostEstimate:
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
