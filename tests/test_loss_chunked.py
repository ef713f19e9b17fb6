"""Chunked cross-entropy (no full (B, L, V) logits) and the LM head on supervised positions only
(`model.loss_positions`) equal the full-logits loss on CPU (fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmlm import IGNORE_INDEX
from mmlm.config_utils import load_config
from mmlm.models.config import model_config_from_dict
from mmlm.models.llava_mini import LlavaMini
from mmlm.models.loss import chunked_token_loss, first_supervised, max_supervised_tokens, token_loss
from mmlm.models.summary import dummy_batch
from mmlm.train import step as step_lib


def test_chunked_equals_full_with_gradients():
    rng = np.random.default_rng(0)
    b, length, d, v = 3, 37, 16, 50  # 37 = 4 chunks of 10, the last padded
    hidden = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
    targets = rng.integers(0, v, size=(b, length))
    targets[rng.random((b, length)) < 0.3] = IGNORE_INDEX
    targets = jnp.asarray(targets, jnp.int32)

    def full(h, w):
        return token_loss(h @ w, targets)

    def chunked(h, w):
        return chunked_token_loss(h, targets, lambda x: x @ w, 10)

    a, c = full(hidden, w), chunked(hidden, w)
    assert int(a["num_tokens"]) == int(c["num_tokens"]) and int(a["num_correct"]) == int(c["num_correct"])
    np.testing.assert_allclose(float(c["loss_sum"]), float(a["loss_sum"]), rtol=1e-6, atol=1e-5)
    ga = jax.grad(lambda h, w: full(h, w)["loss_sum"], argnums=(0, 1))(hidden, w)
    gc = jax.grad(lambda h, w: chunked(h, w)["loss_sum"], argnums=(0, 1))(hidden, w)
    for x, y in zip(ga, gc):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


def test_first_supervised_keeps_the_supervised_positions_in_order():
    hidden = jnp.arange(2 * 6, dtype=jnp.float32).reshape(2, 6, 1)
    targets = jnp.asarray([[-100, 3, -100, 4, 5, -100], [-100, -100, -100, -100, -100, 9]], jnp.int32)
    h, t = first_supervised(hidden, targets, 4)
    assert h.shape == (2, 4, 1) and t.shape == (2, 4)
    # Row 0: positions 1, 3, 4 then one unsupervised filler; row 1: position 5 then fillers.
    np.testing.assert_array_equal(np.asarray(h[0, :3, 0]), [1, 3, 4])
    np.testing.assert_array_equal(np.asarray(t), [[3, 4, 5, IGNORE_INDEX], [9] + [IGNORE_INDEX] * 3])
    assert float(h[1, 0, 0]) == 11
    assert max_supervised_tokens(np.asarray(targets)) == 3


def _unbox(params):
    return jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                        is_leaf=lambda x: hasattr(x, "unbox"))


def _value_and_grad(cfg, params, batch):
    """The train step's loss sums and their gradients, compiled with conftest's fast-compile flags like the rest
    of the suite (the reference and every case alike)."""
    loss = lambda p: step_lib._loss_sums(LlavaMini(cfg), p, batch, 4)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.fixture(scope="module")
def full_logits():
    """The reference every case compares with, computed once: the tiny config (fp32) without loss chunking,
    the LM head on every position; 14 of 20 positions per row carry a target."""
    base = load_config("configs/tiny.py")
    cfg_full = model_config_from_dict({**base.model.to_dict(), "loss_chunk": 0})
    batch = dummy_batch(cfg_full, batch=2, text_len=20, abstract=False)
    labels = np.array(batch["input_ids"]) * 0 + 5
    labels[:, :6] = IGNORE_INDEX
    batch = {**batch, "labels": labels, "input_ids": np.where(np.arange(20) == 1, batch["input_ids"], 7)}
    batch = jax.tree.map(jnp.asarray, batch)
    params = _unbox(LlavaMini(cfg_full).init(jax.random.key(0), batch)["params"])
    return base, params, batch, _value_and_grad(cfg_full, params, batch)


# (loss_chunk, loss_positions) against the full logits over every position
@pytest.mark.parametrize("chunk,positions", [(7, 0), (1024, 0), (0, 16), (1024, 14), (7, 16)])
def test_train_loss_chunked_equals_full_logits(full_logits, chunk, positions):
    """The train step's loss sums and gradients (tiny config, fp32) with and without loss chunking and
    with the LM head on the supervised positions only (14 of 20 per row carry a target)."""
    base, params, batch, ((lf, af), gf) = full_logits
    cfg_chunk = model_config_from_dict({**base.model.to_dict(), "loss_chunk": chunk, "loss_positions": positions})
    (lc, ac), gc = _value_and_grad(cfg_chunk, params, batch)
    assert [int(x) for x in af] == [int(x) for x in ac]
    np.testing.assert_allclose(float(lc), float(lf), rtol=1e-6, atol=1e-5)
    # The two programs sum in different orders, so fp32 rounding moves an element by up to about 1e-6 of its
    # size (gradients reach 524, where one ulp is 6e-5); a wrong chunk or position would move it by far more.
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(gf), jax.tree.leaves(gc)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=4e-6, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_eval_loss_counts_every_supervised_position():
    """`model.loss_positions` limits the training head only: the eval step scores every answer token."""
    base = load_config("configs/tiny.py")
    cfg = model_config_from_dict({**base.model.to_dict(), "loss_positions": 2})
    batch = dummy_batch(cfg, batch=2, text_len=12, abstract=False)
    labels = np.full((2, 12), 5)
    labels[:, :4] = IGNORE_INDEX
    batch = jax.tree.map(jnp.asarray, {**batch, "labels": labels})
    params = _unbox(jax.jit(LlavaMini(cfg).init)(jax.random.key(0), batch)["params"])
    sums = jax.jit(step_lib.make_eval_step(LlavaMini(cfg)), static_argnums=2)(params, batch, 4)
    _, (ntok, _, _) = jax.jit(lambda p, b: step_lib._loss_sums(LlavaMini(cfg), p, b, 4))(params, batch)
    assert int(ntok) == 2 * 2 and int(sums["num_tokens"]) == 2 * 8
