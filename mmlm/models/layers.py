"""Building blocks shared by the vision tower, the LLM and pre-fusion.

Every parameter carries logical axis names (see `mmlm.sharding` for the
rules that map them to mesh axes). Kernels are 2-D `(in, out)` matrices, the
transpose of torch `Linear.weight`, so checkpoint conversion is a transpose.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmlm.models.quant import Dense

Dtype = Any
Initializer = Callable[..., jax.Array]

DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def kernel_initializer(std: float) -> Initializer:
    """Dense kernels at init: N(0, std) (the HF configs' `initializer_range`, 0.02, sized for 4,096-wide
    models); std 0 = lecun normal (std 1/sqrt(fan_in), truncated), for narrow models trained from scratch."""
    return nn.initializers.lecun_normal() if std == 0 else nn.initializers.normal(stddev=std)

# Logical names of activation dimensions. `config.sharding_rules` maps them to mesh axes
# (`mmlm.config_defaults.SHARDING_RULES`: the batch over (data, fsdp), heads / MLP / vocab over tensor).
ACT_BATCH, ACT_LENGTH, ACT_EMBED = "activation_batch", "activation_length", "activation_embed"
ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = "activation_heads", "activation_kv_heads", "activation_mlp", "activation_vocab"
BTD = (ACT_BATCH, ACT_LENGTH, ACT_EMBED)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pins the sharding of activation `x` to what the logical `axes` map to.

    Without these pins GSPMD may keep a matmul's output sharded like its
    FSDP-split weight (over the contracted `embed` dimension) and all-reduce
    whole-batch activations across every chip, instead of all-gathering the
    weight and keeping the batch split. Active only while a mesh
    (`jax.sharding.use_abstract_mesh`) and rules (`nn.logical_axis_rules`)
    are in context, as in the train step; a no-op otherwise (CPU inference,
    tests) and inside `shard_map`. A name without a rule, or whose mesh axes
    do not divide the dimension, is left to the compiler.
    """
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty or mesh.manual_axes:
        return x
    table: dict[str, Any] = {}
    for name, target in rules:  # the first rule for a name wins, as in flax
        table.setdefault(name, target)
    spec = []
    for dim, name in zip(x.shape, axes):
        if name is not None and name not in table:
            spec.append(jax.sharding.PartitionSpec.UNCONSTRAINED)
            continue
        target = None if name is None else table[name]
        mesh_axes = [a for a in ((target,) if isinstance(target, str) else tuple(target or ()))
                     if mesh.shape.get(a, 1) > 1]
        if dim % math.prod(mesh.shape[a] for a in mesh_axes):
            spec.append(jax.sharding.PartitionSpec.UNCONSTRAINED)
            continue
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))


def dense(features: int, axes: tuple[str, str], *, use_bias: bool, dtype: Dtype, param_dtype: Dtype,
          name: str, kernel_init: Initializer = DEFAULT_KERNEL_INIT) -> nn.Dense:
    """`nn.Dense` whose kernel is `axes` and whose bias is `(axes[1],)` (int8 kernels served too)."""
    return Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def layer_norm(eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str, axis: str = "norm") -> nn.LayerNorm:
    """torch-style LayerNorm (biased variance, statistics in fp32)."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis,)),
        name=name,
    )


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: fp32 statistics, weight applied after casting back."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: jax.Array) -> jax.Array:
    """torch `nn.GELU()` default: the erf form, not the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> np.ndarray:
    """Inverse frequencies (head_dim/2,) as transformers computes them.

    `scaling` follows HF `rope_scaling`: None/{} (default) or
    `{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`.
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    scaling = dict(scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return inv.astype(np.float32)
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}; mmlm supports 'default' and 'llama3'")
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, HF `rotate_half` layout. x: (B, T, H, Dh), positions: (B, T)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, T, Dh/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # (B, T, 1, Dh)
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ------------------------------------------------------------------------ attention

def causal_mask(q_slots: jax.Array, key_valid: jax.Array) -> jax.Array:
    """(B, T, S) mask: key slot <= query slot, and the key is valid.

    q_slots: (T,) or (B, T) slot index of each query; key_valid: (B, S).
    """
    s = key_valid.shape[-1]
    if q_slots.ndim == 1:
        q_slots = q_slots[None]
    causal = jnp.arange(s)[None, None, :] <= q_slots[:, :, None]
    return causal & key_valid[:, None, :]


def positions_from_valid(valid: jax.Array) -> jax.Array:
    """Running count of valid positions minus one; invalid positions get 0. (B, T)."""
    return jnp.where(valid, jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


# ---------------------------------------------------------------------- layer stacks

def remat_policy(name: str):
    """Maps a config name to a `jax.checkpoint` policy (None = no remat)."""
    policies = {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }
    if name not in policies:
        raise ValueError(f"unknown remat policy {name!r}; choose from {sorted(policies)}")
    return name, policies[name]


class BlockStack(nn.Module):
    """`num_layers` copies of `block_cls`, scanned (`layers` param axis) or unrolled.

    Every block is called as `block(x, layer_state, *shared) -> (x, new_state)`,
    where `layer_state` is this layer's slice of `state` (e.g. a KV cache with a
    leading layer axis, or None) and `shared` are broadcast to all layers.
    Returns `(x, new_state)` with per-layer states stacked on axis 0.
    """

    block_cls: Any
    block_kwargs: tuple[tuple[str, Any], ...]
    num_layers: int
    scan: bool = True
    remat: str = "none"
    unroll: int = 1  # scanned layers per loop iteration (nn.scan's unroll); 0 = all (no loop left)

    @nn.compact
    def __call__(self, x, state, *shared):
        kwargs = dict(self.block_kwargs)
        block = self.block_cls
        _, policy = remat_policy(self.remat)
        if self.remat != "none":
            block = nn.remat(block, policy=policy, prevent_cse=not self.scan)
        if self.scan:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0,) + (nn.broadcast,) * len(shared),
                out_axes=0,
                length=self.num_layers,
                unroll=self.unroll or self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return scanned(**kwargs, name="layers")(x, state, *shared)
        # A tuple of per-layer states (a decoding KV cache) stays one buffer per layer, so each
        # layer updates its own in place; a stacked state is sliced and re-stacked (copies).
        per_layer = isinstance(state, (list, tuple))
        outs = []
        for i in range(self.num_layers):
            if per_layer:
                layer_state = state[i]
            else:
                layer_state = None if state is None else jax.tree.map(lambda s: s[i], state)
            x, new = block(**kwargs, name=f"layers_{i}")(x, layer_state, *shared)
            outs.append(new)
        if per_layer:
            return x, tuple(outs)
        stacked = None if outs[0] is None else jax.tree.map(lambda *s: jnp.stack(s), *outs)
        return x, stacked


def stack_layers(params: dict, num_layers: int) -> dict:
    """Unrolled `layers_{i}` subtrees -> one scanned `layers` subtree (recursively)."""
    if not isinstance(params, dict):
        return params
    if "layers_0" in params:
        rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
        layers = [params[f"layers_{i}"] for i in range(num_layers)]
        rest["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        return {k: stack_layers(v, num_layers) if k != "layers" else v for k, v in rest.items()}
    return {k: stack_layers(v, num_layers) for k, v in params.items()}


def unstack_layers(params: dict) -> dict:
    """Scanned `layers` subtrees -> unrolled `layers_{i}` subtrees (recursively)."""
    if not isinstance(params, dict):
        return params
    out = {}
    for k, v in params.items():
        if k == "layers":
            n = jax.tree.leaves(v)[0].shape[0]
            for i in range(n):
                out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], v)
        else:
            out[k] = unstack_layers(v)
    return out


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
