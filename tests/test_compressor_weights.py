"""The compressors' `return_weights` path (what compression maps draw) is the attention the model applies."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmlm.config_utils import load_config
from mmlm.models.compressor import make_compressor
from mmlm.models.config import model_config_from_dict


def compressor_cfg(*overrides: str):
    return model_config_from_dict(load_config("configs/tiny.py", list(overrides)).model).compressor


def test_avgpool_weights_rebuild_its_output():
    cfg = compressor_cfg("--config.model.compressor.kind=avgpool")
    comp = make_compressor(cfg, jnp.float32, jnp.float32)
    x = jax.random.normal(jax.random.key(0), (2, 16, 8))
    out = comp.apply({}, x, 4)
    w = comp.apply({}, x, 4, return_weights=True)
    assert w.shape == (2, 1, 4, 16)
    np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jnp.einsum("bmn,bnd->bmd", w[:, 0], x)), np.asarray(out), rtol=1e-5)


@pytest.mark.parametrize("nesting", ["prefix", "pool"])
def test_query_weights_rebuild_its_output(nesting):
    cfg = compressor_cfg(f"--config.model.compressor.nesting={nesting}")
    comp = make_compressor(cfg, jnp.float32, jnp.float32)
    x = jax.random.normal(jax.random.key(1), (2, 16, 32))
    params = nn.unbox(comp.init(jax.random.key(2), x, cfg.tokens))["params"]
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), params)
    w = comp.apply({"params": params}, x, 4, return_weights=True)
    assert w.shape == (2, cfg.heads, 4, 16)
    np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, rtol=1e-5)
    # Mix LN_kv(X) W_v + b_v with the weights, per head, then the output projection: the compressor's output.
    dv = x.shape[-1]
    xn = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + cfg.ln_eps)
    xn = xn * params["ln_kv"]["scale"] + params["ln_kv"]["bias"]
    v = (xn @ params["in_proj_kernel"][:, 2 * dv:] + params["in_proj_bias"][2 * dv:]).reshape(2, 16, cfg.heads, -1)
    mixed = jnp.einsum("bhmn,bnhd->bmhd", w, v).reshape(2, 4, dv)
    rebuilt = mixed @ params["out_proj"]["kernel"] + params["out_proj"]["bias"]
    np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(comp.apply({"params": params}, x, 4)),
                               rtol=1e-4, atol=1e-5)
    # Matryoshka: the 1-token weights are the first row of the 4-token weights (prefix), or their mean (pool).
    one = w[:, :, 0] if nesting == "prefix" else w.mean(axis=2)
    np.testing.assert_allclose(np.asarray(comp.apply({"params": params}, x, 1, return_weights=True)[:, :, 0]),
                               np.asarray(one), rtol=1e-5)
