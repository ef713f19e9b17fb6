"""Weight-only int8 serving: LLM-shaped Dense kernels as int8 with a per-output-channel scale.

A bf16 LLaMA-3.1-8B LLaVA-Mini (LLM, CLIP, 4 pre-fusion layers) needs 17.2
GiB of weights, more than one 16 GiB TPU v5e chip. Stored as int8 the
decoder, pre-fusion and LM-head kernels take half of that; activations stay
in the compute dtype. A kernel `w` (..., in, out) becomes

    scale = max_in |w| / 127          (..., 1, out)   float32
    q     = round(w / scale)          (..., in, out)  int8

and `x @ w` is computed as `(x @ q) * scale`: int8 values are exact in
bfloat16, so the matmul reads int8 from memory and converts on the fly, and
the per-channel scale is applied to the (much smaller) output, in fp32.

Written by hand: symmetric per-channel absmax is a dozen lines, and the
libraries that do it (AQT) aim at quantised training and would be a new
dependency for this one serving option.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

INT8_MAX = 127.0

# Top-level model parts whose Dense kernels are quantised: the LLM's decoder and LM head, and pre-fusion
# (LLM-shaped blocks). The vision tower, projector and compressor are small and stay in the float dtype;
# so does the token embedding table (a gather, not a matmul).
QUANTIZED_PARTS = ("llm", "prefusion")

WEIGHT_FORMATS = ("float", "int8")  # `--weights`: the dtype's own floats, or int8 weight-only


@flax.struct.dataclass
class Int8Kernel:
    """A quantised Dense kernel: `values` int8 (..., in, out) and `scale` float32 (..., 1, out).

    `values` comes first so Flax's parameter shape check (which compares
    leaves in order) sees the kernel's own (in, out) shape.
    """

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The float kernel this stands for: values * scale, (..., in, out)."""
        return (self.values.astype(jnp.float32) * self.scale).astype(dtype)


def quantize_int8(w: jax.Array) -> Int8Kernel:
    """Float kernel (..., in, out) -> `Int8Kernel`, symmetric, one scale per output column.

    Rounding error per weight is at most scale / 2 = max_in |w| / 254. An
    all-zero column gets scale 1 (its values are 0 either way).
    """
    w32 = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=-2, keepdims=True)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    values = jnp.clip(jnp.round(w32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return Int8Kernel(values=values, scale=scale)


def _is_quantized_kernel(path: tuple[Any, ...], leaf: Any) -> bool:
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return (len(keys) >= 2 and keys[0] in QUANTIZED_PARTS and keys[-1] == "kernel"
            and getattr(leaf, "ndim", 0) >= 2)


def quantize_params(params: Any) -> Any:
    """The model's params with every LLM-shaped Dense kernel replaced by an `Int8Kernel`.

    `params` is the model's unboxed "params" tree (scanned or unrolled
    layers alike: a stacked (L, in, out) kernel gets (L, 1, out) scales).
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: quantize_int8(leaf) if _is_quantized_kernel(path, leaf) else leaf, params)


def params_bytes(params: Any) -> int:
    """Bytes of every array in a params tree (int8 values and their scales included)."""
    return int(sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(params)))


class Dense(nn.Dense):
    """`nn.Dense` that also applies an `Int8Kernel` (weight-only int8 serving).

    With a float kernel it computes exactly what `nn.Dense` does.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """inputs (..., in) -> (..., features)."""
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        scale = None
        if isinstance(kernel, Int8Kernel):
            kernel, scale = kernel.values, kernel.scale
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if scale is not None:
            y = (y.astype(jnp.float32) * scale.reshape(-1)).astype(y.dtype)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y
