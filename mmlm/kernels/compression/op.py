"""The differentiable op: custom VJP over the kernels, shape checks, batch sharding and the public entry points."""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmlm.kernels.compression.gpu import backward_gpu, forward_gpu
from mmlm.kernels.compression.plan import (
    F32, Operands, Plan, make_plan, merge_heads, pad_axis, prepare, split_heads, target_platform,
    weight_from_head_major,
)
from mmlm.kernels.compression.reference import compress_attention_xla
from mmlm.kernels.compression.tpu import backward_tpu, forward_tpu


def _forward(plan: Plan, ops: Operands) -> tuple[jax.Array, jax.Array]:
    """Returns o (B, H, mp, dhp) in the output dtype and lse (B, H, mp, 1) fp32."""
    return (forward_tpu if plan.target == "tpu" else forward_gpu)(plan, ops)


def _backward(plan: Plan, ops: Operands, do: jax.Array, lse: jax.Array, delta: jax.Array) -> list[jax.Array]:
    """Runs the backward kernel; returns padded fp32 grads in GradRefs order."""
    return (backward_tpu if plan.target == "tpu" else backward_gpu)(plan, ops, do, lse, delta)


def _outputs(plan: Plan, o: jax.Array) -> jax.Array:
    """(B, H, mp, dhp) -> (B, m, Dv)."""
    return merge_heads(jnp.transpose(o[:, :, : plan.m], (0, 2, 1, 3)), plan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(plan: Plan, x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k) -> jax.Array:
    o, _ = _forward(plan, prepare(plan, x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k))
    return _outputs(plan, o)


def _fused_fwd(plan: Plan, x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k):
    args = (x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k)
    o, lse = _forward(plan, prepare(plan, *args))
    return _outputs(plan, o), (args, o, lse)


def _fused_bwd(plan: Plan, res, dout: jax.Array):
    args, o, lse = res
    x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k = args
    ops = prepare(plan, *args)
    do = pad_axis(jnp.transpose(split_heads(dout.astype(F32), plan), (0, 2, 1, 3)), 2, plan.m_pad)
    delta = jnp.sum(do * o.astype(F32), axis=-1, keepdims=True)  # (B, H, mp, 1)
    dx, dq, dwk, dbk, dwv, dbv, dg, dbeta = _backward(plan, ops, do.astype(plan.cdt), lse, delta)
    dq = merge_heads(jnp.transpose(dq[:, : plan.m], (1, 0, 2)), plan) * plan.scale
    vec = lambda a: merge_heads(a[:, 0], plan)
    grads = (
        dx[:, : plan.n, : plan.dv], dq, dg[0, : plan.dv], dbeta[0, : plan.dv],
        weight_from_head_major(dwk, plan), vec(dbk), weight_from_head_major(dwv, plan), vec(dbv),
    )
    grads = tuple(g.astype(a.dtype) for g, a in zip(grads, args))
    return (*grads, jnp.zeros_like(pe_k))


_fused.defvjp(_fused_fwd, _fused_bwd)


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
    """The fused Pallas kernel with an explicit schedule (see :mod:`mmlm.kernels.compression`).

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
        plan = make_plan(x, weights[0], num_heads, eps, block_n, block_d, target, interpret)
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
