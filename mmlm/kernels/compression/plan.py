"""Planning of a kernel call: target platform, block sizes, padded shapes and operand layout.

Padding (done here with zeros, sliced off by the op afterwards):

* N -> multiple of ``block_n``; padded keys get a score of -1e30 (probability
  exactly 0), so odd N (37, 577, ...) work. The default TPU ``block_n``
  divides N when it can (576 -> 288, 2304 -> 384), so the usual shapes are
  not padded: padding copies all the features in HBM.
* m -> multiple of 8 (TPU sublanes) or a power of two >= 16 (Triton ``dot``);
  padded query rows are zero and their cotangent is zero.
* dh (per-head width) -> multiple of 128 (TPU lanes) or a power of two >= 16;
  padded weight columns are zero, so padded k / v / out channels are zero.
* Dv (LayerNorm width) -> multiple of 128 (TPU) or of ``block_d`` (GPU);
  padded channels of x / ln_scale / ln_bias / weight rows are zero and the
  LayerNorm statistics divide by the true Dv and mask the padded channels.

Weights are re-laid out head-major, ``(H, Dv, dh)``, so a program selects a
head with a dynamic index on the untiled leading axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32
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


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Matmul operand dtype: fp32 stays fp32, low precision stays low precision."""
    return jnp.dtype(F32) if jnp.dtype(dtype) == jnp.dtype(F32) else jnp.dtype(dtype)


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


@dataclasses.dataclass(frozen=True)
class Plan:
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


def make_plan(
    x: jax.Array, q: jax.Array, num_heads: int, eps: float, block_n: int | None,
    block_d: int | None, target: str, interpret: bool,
) -> Plan:
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
    return Plan(
        batch=bsz, n=n, dv=dv, m=m, heads=num_heads, dh=dh,
        n_pad=_round_up(n, block_n), dv_pad=dv_pad, m_pad=m_pad, dh_pad=dh_pad,
        block_n=block_n, block_d=block_d, target=target, interpret=interpret, eps=float(eps),
        compute_dtype=compute_dtype(x.dtype).name, out_dtype=jnp.dtype(x.dtype).name,
    )


class Operands(NamedTuple):
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


def pad_axis(a: jax.Array, axis: int, size: int) -> jax.Array:
    extra = size - a.shape[axis]
    if extra == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def split_heads(a: jax.Array, plan: Plan) -> jax.Array:
    """(..., Dv) -> (..., H, dhp): head h = channels [h*dh, (h+1)*dh), zero padded."""
    a = a.reshape(*a.shape[:-1], plan.heads, plan.dh)
    return pad_axis(a, a.ndim - 1, plan.dh_pad)


def merge_heads(a: jax.Array, plan: Plan) -> jax.Array:
    """(..., H, dhp) -> (..., Dv): inverse of split_heads."""
    a = a[..., : plan.dh]
    return a.reshape(*a.shape[:-2], plan.dv)


def _head_major_weight(w: jax.Array, plan: Plan) -> jax.Array:
    """(Dv_in, Dv_out) -> (H, Dvp_in, dhp)."""
    w = split_heads(pad_axis(w, 0, plan.dv_pad), plan)  # (Dvp, H, dhp)
    return jnp.transpose(w, (1, 0, 2)).astype(plan.cdt)


def weight_from_head_major(g: jax.Array, plan: Plan) -> jax.Array:
    """(H, Dvp, dhp) -> (Dv, Dv): inverse layout of _head_major_weight."""
    return merge_heads(jnp.transpose(g, (1, 0, 2)), plan)[: plan.dv]


def prepare(plan: Plan, x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k) -> Operands:
    row = lambda a: pad_axis(a.astype(F32).reshape(1, plan.dv), 1, plan.dv_pad)
    qh = split_heads((q.astype(F32) * plan.scale), plan)  # (m, H, dhp)
    qh = pad_axis(jnp.transpose(qh, (1, 0, 2)), 1, plan.m_pad).astype(plan.cdt)
    return Operands(
        x=pad_axis(pad_axis(x, 1, plan.n_pad), 2, plan.dv_pad),
        pe=pad_axis(pad_axis(pe_k.astype(plan.cdt), 0, plan.n_pad), 1, plan.dv_pad),
        ln_scale=row(ln_scale),
        ln_bias=row(ln_bias),
        q=qh,
        wk=_head_major_weight(wk, plan),
        bk=split_heads(bk.astype(F32), plan)[:, None, :],
        wv=_head_major_weight(wv, plan),
        bv=split_heads(bv.astype(F32), plan)[:, None, :],
    )
