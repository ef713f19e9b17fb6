"""Whole-sequence attention implementations (mmlm.kernels.attention) and activation sharding pins."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmlm.kernels.attention import flops_tag, resolve_attention_impl, self_attention
from mmlm.kernels.compression import compile_platform
from mmlm.models.config import LlamaConfig
from mmlm.models.layers import BTD, constrain
from mmlm.models.llama import LlamaModel


def _qkv(b, t, h, hkv, d, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return f(b, t, h, d), f(b, t, hkv, d), f(b, t, hkv, d)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_equals_xla_on_valid_rows_forward_and_backward(causal):
    """Splash (Pallas TPU kernel, interpret mode on CPU) with GQA, padding inside and at the end of rows, and
    a length that is not a block multiple: outputs and q/k/v gradients of valid rows equal the XLA path's."""
    b, t, h, hkv, d = 2, 40, 4, 2, 32
    q, k, v = _qkv(b, t, h, hkv, d)
    valid = np.ones((b, t), bool)
    valid[0, 30:] = False
    valid[1, [3, 17, 18]] = False
    valid = jnp.asarray(valid)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((b, t, h, d)), jnp.float32) * valid[:, :, None, None]

    def loss(impl):
        return lambda q, k, v: jnp.sum(self_attention(q, k, v, valid, causal=causal, impl=impl) * w)

    ref = self_attention(q, k, v, valid, causal=causal, impl="xla")
    got = self_attention(q, k, v, valid, causal=causal, impl="splash")
    np.testing.assert_allclose(np.asarray(got)[np.asarray(valid)], np.asarray(ref)[np.asarray(valid)], atol=1e-5)
    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
    for a, c in zip(g_got, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)


def test_llama_logits_equal_across_attention_implementations():
    cfg = LlamaConfig(vocab_size=64, width=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp_dim=128)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 24)), jnp.int32)
    valid = jnp.asarray(np.arange(24)[None] < np.array([[24], [15]]))
    xla = LlamaModel(cfg, attention="xla")
    params = xla.init(jax.random.key(0), ids, valid, method=LlamaModel.forward_tokens)
    ref = xla.apply(params, ids, valid, method=LlamaModel.forward_tokens)
    got = LlamaModel(cfg, attention="splash").apply(params, ids, valid, method=LlamaModel.forward_tokens)
    np.testing.assert_allclose(np.asarray(got)[np.asarray(valid)], np.asarray(ref)[np.asarray(valid)], atol=1e-5)


def test_auto_picks_splash_for_tpu_cudnn_for_gpu_xla_for_cpu():
    assert resolve_attention_impl("auto") == "xla"
    with compile_platform("tpu"):
        assert resolve_attention_impl("auto") == "splash"
    with compile_platform("gpu"):
        assert resolve_attention_impl("auto") == "cudnn"
    assert resolve_attention_impl("splash") == "splash"
    with pytest.raises(ValueError, match="model.attention"):
        resolve_attention_impl("flash")


def test_flops_tag_names_every_kernel():
    assert flops_tag(fwd=4.0, dq=6.0, dkv=8.0) == "mmlm_pallas_flops_fwd_4_dq_6_dkv_8"


def test_activation_constraints_apply_only_under_a_mesh_and_rules():
    x = jnp.ones((8, 3, 4))
    plain = str(jax.make_jaxpr(lambda a: constrain(a, BTD))(x))
    assert "sharding_constraint" not in plain
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    rules = (("activation_batch", ("data", "fsdp")), ("activation_length", None), ("activation_embed", None))

    def pinned(a):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return constrain(a, BTD)

    assert "sharding_constraint" in str(jax.make_jaxpr(pinned)(x))
