"""Weight-only int8 serving (`mmlm.models.quant`): the quantiser, the Dense that applies it, a whole model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmlm import IMAGE_TOKEN_ID
from mmlm.config_utils import load_config
from mmlm.infer.batching import make_batch, views_per_frame
from mmlm.infer.generate import decoding_layout, generate
from mmlm.infer.random_model import random_params
from mmlm.models.config import model_config_from_dict
from mmlm.models.llava_mini import LlavaMini
from mmlm.models.quant import Dense, Int8Kernel, params_bytes, quantize_int8, quantize_params


def test_quantize_int8_error_bound_and_zero_column():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 64, 8)).astype(np.float32)  # stacked (L, in, out)
    w[1, :, 5] = 0.0
    q = quantize_int8(w)
    assert q.values.dtype == jnp.int8 and q.values.shape == w.shape and q.scale.shape == (3, 1, 8)
    assert int(jnp.max(jnp.abs(q.values.astype(jnp.int32)))) == 127  # each column's largest weight maps to 127
    err = np.abs(np.asarray(q.dequantize()) - w)
    assert np.all(err <= np.asarray(q.scale) / 2 + 1e-7)
    assert np.all(np.asarray(q.dequantize())[1, :, 5] == 0.0)


@pytest.mark.parametrize("use_bias", [False, True])
def test_dense_int8_equals_dense_on_dequantized_kernel(use_bias):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
    layer = Dense(16, use_bias=use_bias)
    params = layer.init(jax.random.key(0), x)["params"]
    if use_bias:
        params = {**params, "bias": jnp.asarray(rng.standard_normal(16), jnp.float32)}
    # A float kernel: exactly nn.Dense.
    np.testing.assert_array_equal(layer.apply({"params": params}, x), nn.Dense(16, use_bias=use_bias).apply(
        {"params": params}, x))
    q = quantize_int8(params["kernel"])
    int8_out = layer.apply({"params": {**params, "kernel": q}}, x)
    float_out = layer.apply({"params": {**params, "kernel": q.dequantize()}}, x)
    np.testing.assert_allclose(int8_out, float_out, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    cfg = model_config_from_dict(load_config("configs/tiny.py").model)
    cfg, params = decoding_layout(cfg, random_params(cfg, seed=0))
    return cfg, params


def _batch(cfg):
    rng = np.random.default_rng(0)
    s = cfg.image_size
    media = [rng.standard_normal((1, views_per_frame(cfg), s, s, 3)).astype(np.float32), None]
    prompts = [[1, 5, IMAGE_TOKEN_ID, 7, 8, 9], [1, 4, 5, 6, 7, 8]]
    return make_batch(cfg, prompts, media, pad_id=0, pad_len_to=12, frames=1)


def test_model_int8_quantises_llm_kernels_only(tiny):
    cfg, params = tiny
    q = quantize_params(params)
    kinds = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(q, is_leaf=lambda a: isinstance(a, Int8Kernel))[0]:
        kinds.setdefault(path[0].key, set()).add(type(leaf).__name__)
    assert kinds["llm"] == {"Int8Kernel", "ArrayImpl"}  # kernels int8; embedding table and norms float
    assert kinds["prefusion"] == {"Int8Kernel", "ArrayImpl"}
    for part in ("vision", "projector", "compressor"):
        assert kinds[part] == {"ArrayImpl"}
    # Each quantised fp32 kernel (in, out) shrinks from 4 bytes per weight to 1, plus 4 bytes per column scale.
    kernels = [a for a in jax.tree.leaves(q, is_leaf=lambda a: isinstance(a, Int8Kernel))
               if isinstance(a, Int8Kernel)]
    saved = sum(3 * k.values.size - 4 * k.scale.size for k in kernels)
    assert params_bytes(q) == params_bytes(params) - saved and saved > 0


def test_model_int8_forward_and_generation(tiny):
    """Int8 logits equal the float model run on the dequantised kernels, and stay close to the original."""
    cfg, params = tiny
    q = quantize_params(params)
    dequantized = jax.tree.map(lambda a: a.dequantize() if isinstance(a, Int8Kernel) else a, q,
                               is_leaf=lambda a: isinstance(a, Int8Kernel))
    batch = _batch(cfg)
    fwd = jax.jit(lambda p, b: LlavaMini(cfg).apply({"params": p}, b)["logits"])
    ref, deq, int8 = (np.asarray(fwd(p, batch)) for p in (params, dequantized, q))
    np.testing.assert_allclose(int8, deq, atol=2e-5, rtol=1e-4)
    rel = np.linalg.norm(int8 - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.02, rel  # quantisation changes the logits, by about a percent
    tokens_q, _ = generate(cfg, q, batch, max_new_tokens=4, eos_id=[-7])
    tokens_d, _ = generate(cfg, dequantized, batch, max_new_tokens=4, eos_id=[-7])
    assert tokens_q.tolist() == tokens_d.tolist()
