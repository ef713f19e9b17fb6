"""Matryoshka training recipes (`mmlm.train.recipe`) on the tiny model: weighted draws, per-budget loss weights,
self-distillation from the largest budget, and the FLOPs each one costs (`train_flops` of the paper-trends runs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmlm.config_utils import ConfigError, load_config
from mmlm.train.config import validate_config
from mmlm.models.flops import train_step_flops
from mmlm.train import trainer
from mmlm.train.recipe import MatryoshkaRecipe, distill_kl_sum, recipe_from_config, train_run_flops
from mmlm.train.step import budget_index, make_eval_step, make_train_step
from mmlm import IGNORE_INDEX
from test_train_unit import T, batch_for  # the same random conversations as the train-step tests

FAST_COMPILE = {"xla_backend_optimization_level": 0}  # numbers, not speed: skip LLVM's optimisation passes


def tiny(*overrides: str):
    return load_config("configs/tiny.py", list(overrides))


@pytest.fixture(scope="module")
def tiny_state():
    config = tiny()
    setup = trainer.build_setup(config, 10)
    return config, setup, trainer.init_state(setup, 0)


def _split(setup, state):
    train = {p: state["params"][p] for p in setup.parts}
    frozen = {p: v for p, v in state["params"].items() if p not in setup.parts}
    return train, frozen


def _jit(f, **kw):
    """A reference as one compiled program: op by op, the model's hundreds of small programs take longer to
    lower and compile than the whole (arrays are arguments, not constants folded into the program)."""
    return jax.jit(f, compiler_options=FAST_COMPILE, **kw)


def _step(setup, recipe):
    return jax.jit(make_train_step(setup.model, setup.tx, setup.parts, setup.budgets, 1, setup.schedules,
                                   setup.mesh, recipe=recipe), compiler_options=FAST_COMPILE)


def test_weighted_draws_follow_the_probabilities():
    rng = jnp.asarray([0, 7], jnp.uint32)
    picks = np.array([int(budget_index(rng, jnp.int32(s), 3, (0.1, 0.1, 0.8))) for s in range(300)])
    assert set(picks) == {0, 1, 2} and 0.7 < np.mean(picks == 2) < 0.9
    assert {int(budget_index(rng, jnp.int32(s), 2, (0.0, 1.0))) for s in range(50)} == {1}
    # No probabilities: the uniform draw every run recorded so far used (same budgets at the same steps).
    uniform = [int(budget_index(rng, jnp.int32(s), 3)) for s in range(20)]
    key = jax.random.wrap_key_data(rng)
    assert uniform == [int(jax.random.randint(jax.random.fold_in(key, s), (), 0, 3)) for s in range(20)]


def test_all_with_weights_trains_the_weighted_mean(tiny_state):
    config, setup, state = tiny_state
    batch = batch_for(setup.cfg)
    ev = _jit(make_eval_step(setup.model), static_argnums=2)
    sums = {m: ev(state["params"], batch, m) for m in setup.budgets}
    loss = {m: float(r["loss_sum"] / r["num_tokens"]) for m, r in sums.items()}
    _, m = _step(setup, MatryoshkaRecipe(loss="all", weights=(0.25, 0.75)))(state, batch)
    assert float(m["loss"]) == pytest.approx(0.25 * loss[1] + 0.75 * loss[4], rel=1e-5)
    assert int(m["supervised_tokens"]) == 8 * 3


def test_distill_adds_the_kl_from_the_largest_budget_and_only_the_student_learns(tiny_state):
    config, setup, state = tiny_state
    batch = batch_for(setup.cfg)
    train, frozen = _split(setup, state)
    model = setup.model
    from mmlm.models.loss import first_supervised, targets_from_labels, token_loss

    # The teacher: a constant, computed outside the gradient.
    teacher = _jit(lambda p, b: model.apply({"params": p}, b, 4))(state["params"], batch)
    t_logits, t_targets = teacher["logits"], targets_from_labels(batch["labels"], teacher["text_index"])

    def reference(tp, w, frozen, batch, t_logits, t_targets):
        """The loss, and the answer tokens of student and teacher (checked equal: the same tokens, in order)."""
        out = model.apply({"params": {**tp, **frozen}}, batch, 1)
        targets = targets_from_labels(batch["labels"], out["text_index"])
        ce = token_loss(out["logits"], targets)
        s, st = first_supervised(out["logits"], targets, targets.shape[1])
        t, tt = first_supervised(t_logits, t_targets, targets.shape[1])
        return (ce["loss_sum"] + w * distill_kl_sum(s, t, st != IGNORE_INDEX)) / ce["num_tokens"], (st, tt)

    def same_answer_tokens(aux):
        st, tt = aux
        np.testing.assert_array_equal(np.asarray(st), np.asarray(tt))

    consts = (frozen, batch, t_logits, t_targets)
    rng = state["rng"]
    s1 = next(s for s in range(50) if int(budget_index(rng, jnp.int32(s), 2)) == 0)  # a step that draws 1 token
    s4 = next(s for s in range(50) if int(budget_index(rng, jnp.int32(s), 2)) == 1)
    step = _step(setup, MatryoshkaRecipe(loss="distill", distill_weight=0.5))
    for w, fn in ((0.5, step),):
        (want, aux), grads = _jit(jax.value_and_grad(reference, has_aux=True))(train, w, *consts)
        same_answer_tokens(aux)
        _, m = fn(dict(state, step=jnp.asarray(s1, jnp.int32)), batch)
        assert int(m["budget"]) == 1
        assert float(m["loss"]) == pytest.approx(float(want), rel=1e-5)
        assert float(m["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-4)
    ref = _jit(reference)
    (with_kl, aux1), (without, aux0) = ref(train, 1.0, *consts), ref(train, 0.0, *consts)
    same_answer_tokens(aux1)
    same_answer_tokens(aux0)
    kl = float(with_kl - without)
    assert kl > 0  # the random model's 1- and 4-token answers differ
    # A step that draws the largest budget is a plain cross-entropy step (no teacher).
    ev = _jit(make_eval_step(model), static_argnums=2)(state["params"], batch, 4)
    _, m = step(dict(state, step=jnp.asarray(s4, jnp.int32)), batch)
    assert int(m["budget"]) == 4 and float(m["loss"]) == pytest.approx(float(ev["loss_sum"] / ev["num_tokens"]),
                                                                       rel=1e-5)


def test_recipes_are_config_knobs_and_their_flops_are_counted():
    config = tiny("--config.train.matryoshka_loss=distill")
    config.train.matryoshka_probs = (1, 3)
    recipe = recipe_from_config(config)
    assert recipe == MatryoshkaRecipe(loss="distill", probs=(0.25, 0.75), weights=(), distill_weight=1.0)
    assert trainer.build_setup(config, 10).recipe == recipe
    cfg = trainer.build_setup(config, 10).cfg
    kw = dict(batch_size=8, text_len=T, trainable=config.train.trainable)
    one, four = (train_step_flops(cfg, budgets=(m,), **kw)["total"] for m in (1, 4))
    fwd4 = train_step_flops(cfg, budgets=(4,), **{**kw, "trainable": ()})["total"]  # forward only
    assert 0 < fwd4 < four / 2
    assert train_step_flops(cfg, budgets=(1, 4), **kw)["total"] == pytest.approx((one + four) / 2)
    assert train_step_flops(cfg, budgets=(1, 4), budget_probs=(1, 3), **kw)["total"] == pytest.approx(
        0.25 * one + 0.75 * four)
    assert train_step_flops(cfg, budgets=(1, 4), budget_probs=(1, 3), distill=True, **kw)["total"] == \
        pytest.approx(0.25 * (one + fwd4) + 0.75 * four)
    # A run's train_flops: every step at the batch shape the trainer uses (no length buckets: max_text_len).
    per = train_step_flops(cfg, batch_size=8, text_len=32, trainable=config.train.trainable, budgets=(1, 4),
                           budget_probs=(1, 3), distill=True)["total"]
    assert train_run_flops(config) == pytest.approx(10 * per)
    from mmlm.train.metrics import model_flops_per_step  # the trainer's MFU numerator agrees
    batch = {"input_ids": np.zeros((8, 32), np.int32), "images": np.zeros((8, 1, 1, 32, 32, 3), np.uint8)}
    assert model_flops_per_step(cfg, batch, config.train.trainable, (1, 4), recipe=recipe) == pytest.approx(per)
    vp = tiny()
    vp.train.vision_pretrain.steps = 5
    assert train_run_flops(vp) > train_run_flops(tiny())  # the ViT pretraining steps count too


@pytest.mark.parametrize("key, value, match", [
    ("matryoshka_probs", (1.0,), "one non-negative number per Matryoshka budget"),
    ("matryoshka_weights", (0.0, 0.0), "not all 0"),
    ("matryoshka_probs", (-1.0, 2.0), "non-negative"),
    ("distill_weight", -0.5, "must be >= 0"),
    ("largest_weights", (1.0, 0.0), "needs a weight > 0"),
])
def test_bad_recipe_knobs_are_clear_errors(key, value, match):
    config = tiny()
    if key == "largest_weights":  # "largest" trains the largest budget every step: its weight cannot be 0
        config.train.matryoshka_loss, key = "largest", "matryoshka_weights"
    config.train[key] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(config)


def test_largest_trains_the_largest_budget_every_step_beside_the_drawn_one(tiny_state):
    config, setup, state = tiny_state
    batch = batch_for(setup.cfg)
    train, frozen = _split(setup, state)
    ev = make_eval_step(setup.model)

    def loss_at(tp, frozen, batch, m):
        r = ev({**tp, **frozen}, batch, m)
        return r["loss_sum"] / r["num_tokens"]

    value_and_grad = _jit(jax.value_and_grad(loss_at), static_argnums=3)
    (l1, g1), (l4, g4) = (value_and_grad(train, frozen, batch, m) for m in (1, 4))
    step = _step(setup, MatryoshkaRecipe(loss="largest"))
    rng = state["rng"]
    for s in range(4):
        drawn = int(budget_index(rng, jnp.int32(s), 2))
        _, m = step(dict(state, step=jnp.asarray(s, jnp.int32)), batch)
        if drawn == 0:  # 1 token drawn: 4 tokens train beside it, the loss and gradient their mean
            want, grads = (float(l1) + float(l4)) / 2, jax.tree.map(lambda a, b: (a + b) / 2, g1, g4)
        else:
            want, grads = float(l4), g4
        assert float(m["loss"]) == pytest.approx(want, rel=1e-5)
        assert float(m["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-4)
        assert int(m["supervised_tokens"]) == 8 * 3
    # With loss weights a paired step's loss and gradient are the weighted mean (w1 = 3 w4 here).
    step = _step(setup, MatryoshkaRecipe(loss="largest", weights=(0.75, 0.25)))
    paired = next(s for s in range(8) if int(budget_index(rng, jnp.int32(s), 2)) == 0)
    _, m = step(dict(state, step=jnp.asarray(paired, jnp.int32)), batch)
    assert float(m["loss"]) == pytest.approx(0.75 * float(l1) + 0.25 * float(l4), rel=1e-5)
    grads = jax.tree.map(lambda a, b: 0.75 * a + 0.25 * b, g1, g4)
    assert float(m["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-4)
    cfg = setup.cfg
    kw = dict(batch_size=8, text_len=T, trainable=config.train.trainable)
    one, four = (train_step_flops(cfg, budgets=(m,), **kw)["total"] for m in (1, 4))
    assert train_step_flops(cfg, budgets=(1, 4), with_largest=True, **kw)["total"] == pytest.approx(
        (one + four) / 2 + four / 2)
