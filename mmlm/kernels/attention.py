"""Self-attention of whole sequences (training, scoring, prefill): XLA, splash (TPU) or cuDNN (GPU).

Semantics, per batch row: query t attends key s when s <= t (causal) and
`key_valid[s]`; every query also sees itself. Rows of queries that are not
valid themselves are unspecified: every caller discards them (padding, or
text that pre-fusion does not fuse).

* ``"xla"``: `mmlm.models.layers`-style dense attention, fp32 scores and
  softmax over a (B, H, T, T) array. The reference; CPU default.
* ``"splash"``: JAX's own Pallas TPU splash attention
  (`jax.experimental.pallas.ops.tpu.splash_attention`): a flash-style kernel
  that never materialises the scores and skips fully masked blocks. Key
  validity becomes segment ids (valid = 1, invalid = 0): a valid query sees
  exactly the valid keys before it, an invalid one only invalid keys (its
  row is unspecified anyway, and never empty: it sees itself). Sequences are
  padded to a multiple of the block size with invalid positions. GQA runs
  the multi-query kernel once per KV head. Under a sharded jit it sits in a
  `shard_map` over the batch axes (a Mosaic kernel has no GSPMD rule).
* ``"cudnn"``: `jax.nn.dot_product_attention(implementation="cudnn")` with
  the dense mask (GPU).

``"auto"`` picks splash when compiling for TPU, cuDNN on GPU, XLA on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mmlm.kernels.compression.plan import target_platform

IMPLS = ("auto", "xla", "splash", "cudnn")
# Splash attention (a JAX library kernel) carries no `pl.CostEstimate`, so its calls run inside a named
# scope `flops_tag(...)` holding the exact FLOPs of its forward, dq and dkv kernels on one chip; the
# roofline of `mmlm compile` (`mmlm.bench.roofline`) reads them from the HLO metadata.
FLOPS_TAG = "mmlm_pallas_flops"
SPLASH_BLOCK = 512  # tokens per splash block (q, kv and backward); sequences are padded to a multiple of it


def flops_tag(**kernel_flops: float) -> str:
    """A scope name giving each kernel's FLOPs: keys are substrings of kernel names ("fwd", "dq", "dkv")."""
    return FLOPS_TAG + "".join(f"_{k}_{int(v)}" for k, v in kernel_flops.items())


def resolve_attention_impl(impl: str) -> str:
    """'auto' -> 'splash' for TPU targets, 'cudnn' for GPU, 'xla' on CPU."""
    if impl not in IMPLS:
        raise ValueError(f"model.attention must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return {"tpu": "splash", "gpu": "cudnn"}.get(target_platform(), "xla")


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention with grouped KV heads, fp32 scores.

    q: (B, T, H, Dh); k, v: (B, S, Hkv, Dh) with H a multiple of Hkv;
    mask: (B, T, S) bool, True = may attend (None = everything).
    Returns (B, T, H, Dh). A fully masked row gives a uniform (finite) average rather than NaN.
    """
    b, t, h, dh = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, h // hkv, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / np.sqrt(dh).astype(np.float32)
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, dh)


def _dense_mask(key_valid: jax.Array | None, t: int, causal: bool) -> jax.Array | None:
    mask = None
    if causal:
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
    if key_valid is not None:
        kv = key_valid[:, None, :]
        mask = kv if mask is None else mask & kv
    return mask


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None, *, causal: bool,
                   impl: str = "auto", interpret: bool | None = None) -> jax.Array:
    """Self-attention over whole sequences (see the module docstring).

    q: (B, T, H, Dh); k, v: (B, T, Hkv, Dh); key_valid: (B, T) bool or None
    (all valid). Returns (B, T, H, Dh) in v's dtype.
    """
    impl = resolve_attention_impl(impl)
    if impl == "splash":
        return _sharded_over_batch(functools.partial(_splash, causal=causal, interpret=interpret),
                                   q, k, v, key_valid)
    mask = _dense_mask(key_valid, q.shape[1], causal)
    if impl == "cudnn":
        if mask is not None:
            mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[1], q.shape[1]))[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[1], q.shape[1]))
    return dense_attention(q, k, v, mask)


def _sharded_over_batch(fn, q, k, v, key_valid):
    """`fn` in a `shard_map` over the mesh's batch axes when a mesh is in context (else as is)."""
    from mmlm.sharding import BATCH_AXES

    if key_valid is None:
        key_valid = jnp.ones(q.shape[:2], bool)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return fn(q, k, v, key_valid)
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if axes and q.shape[0] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    spec = P(axes) if axes else P()
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)(q, k, v, key_valid)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, *, causal: bool,
            interpret: bool | None) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, dh = q.shape
    hkv = k.shape[2]
    groups = h // hkv
    block = min(SPLASH_BLOCK, -(-t // 128) * 128)
    padded = -(-t // block) * block
    pad = padded - t
    scale = 1.0 / np.sqrt(dh)
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
        key_valid = jnp.pad(key_valid, ((0, 0), (0, pad)))
    shape = (padded, padded)
    head_mask = sm.CausalMask(shape) if causal else sm.FullMask(shape)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    interpret = target_platform() == "cpu" if interpret is None else interpret
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([head_mask] * groups), block_sizes=sizes,
                                              interpret=interpret)
    seg = key_valid.astype(jnp.int32)
    # (B, T, H, Dh) -> per row and KV head: q (G, T, Dh), k / v (T, Dh).
    qg = q.reshape(b, padded, hkv, groups, dh).transpose(0, 2, 3, 1, 4)
    kg, vg = (a.transpose(0, 2, 1, 3) for a in (k, v))

    def one(qh, kh, vh, s):
        return kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=s, kv=s))

    # Work per chip: every (q block, kv block) pair the mask does not rule out, 2 * block^2 * Dh FLOPs per
    # matmul; forward 2 matmuls, dq 3 (scores recomputed), dkv 4; for B x H query heads.
    nb = padded // block
    pairs = nb * (nb + 1) // 2 if causal else nb * nb
    unit = 2.0 * block * block * dh * pairs * b * h
    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))                       # over KV heads
    with jax.named_scope(flops_tag(fwd=2 * unit, dq=3 * unit, dkv=4 * unit)):
        out = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(qg, kg, vg, seg)      # over the batch
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, padded, h, dh)             # (B, T, H, Dh)
    return out[:, :t].astype(v.dtype)
