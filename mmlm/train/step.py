"""The jitted train and eval steps.

Train state (a plain dict, so Orbax saves it item by item):

    {"step": () int32, "params": fp32 master weights, "opt_state": optax state,
     "rng": (2,) uint32 raw key data of the run's base key}

One `train_step` = one optimizer update over the global batch:

1. The step's key is `fold_in(rng, step)`; it samples the Matryoshka budget
   (index into `budgets`) uniformly. The budget is a static shape, so the
   forward is a `lax.switch` with one branch per budget: one compiled
   program, only the chosen branch runs, and resuming at any step replays
   the same budgets. With `all_budgets` (`train.matryoshka_loss="all"`, M3's
   training) every budget runs on the batch instead and the loss is the mean
   of the budgets' losses (the supervised tokens are the same at every budget). The other recipes
   (weighted draws, per-budget loss weights, self-distillation from the largest budget) are
   `mmlm.train.recipe`'s.
2. The batch (B, ...) is split into `grad_accum` micro-batches; a `lax.scan`
   sums per-token loss and gradients over them (activations for only B/k
   sequences are live). Gradients are taken w.r.t. the trainable parts only.
3. The loss is the mean over all supervised tokens of the global batch
   (sum / count, so micro-batching, sharding and hosts do not change it).
4. Non-finite gradients leave params and optimizer state unchanged: the
   optimizer is wrapped in `optax.apply_if_finite` (`mmlm.train.optimizer`),
   which then returns a zero update and keeps its inner state. `finite` in
   the metrics is 0 when the loss or the gradients are non-finite; the host
   then stops the run without saving (`mmlm.train.trainer`), so a NaN/inf
   loss whose gradients happen to be finite (the update is applied in
   memory) never reaches a checkpoint either.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmlm import IGNORE_INDEX
from mmlm.models.llava_mini import LlavaMini
from mmlm.models.loss import chunked_token_loss, first_supervised, targets_from_labels, token_loss
from mmlm.sharding import BATCH_AXES, rules_tuple
from mmlm.train import recipe as recipe_lib
from mmlm.train.recipe import MatryoshkaRecipe
from mmlm.train.optimizer import Schedule, split_trainable, zeros_for

State = dict[str, Any]
Batch = dict[str, jax.Array]
# Batch entries the model reads; anything else the pipeline yields (example ids, ...) stays on the host.
MODEL_KEYS = ("input_ids", "labels", "attention_mask", "fuse_mask", "images", "frame_mask")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def _loss_sums(model: LlavaMini, params: dict, batch: Batch, budget: int,
               all_positions: bool = False) -> tuple[jax.Array, tuple]:
    """(sum of token cross-entropy, (supervised tokens, correct tokens, LLM input tokens)).

    With `model.loss_positions` > 0 (and not `all_positions`) the LM head runs
    only on each row's first loss_positions supervised positions
    (`first_supervised`; the trainer checks on the host that no row has more).
    With `model.loss_chunk` > 0 the LM head and the loss run chunk by chunk
    (`chunked_token_loss`): the full (B, L, V) logits never exist.
    """
    cfg = model.cfg
    positions = 0 if all_positions else cfg.loss_positions
    if cfg.loss_chunk <= 0 and positions <= 0:
        out = model.apply({"params": params}, batch, budget)
        sums = token_loss(out["logits"], targets_from_labels(batch["labels"], out["text_index"]))
        return sums["loss_sum"], (sums["num_tokens"], sums["num_correct"], jnp.sum(out["valid"]))
    out = model.apply({"params": params}, batch, budget, method=LlavaMini.hidden_states)
    logits_fn = lambda h: model.apply({"params": params}, h, method=LlavaMini.lm_logits)
    hidden, targets = out["hidden"], targets_from_labels(batch["labels"], out["text_index"])
    if positions > 0:
        hidden, targets = first_supervised(hidden, targets, positions)
    if cfg.loss_chunk > 0:
        sums = chunked_token_loss(hidden, targets, logits_fn, cfg.loss_chunk)
    else:
        sums = token_loss(logits_fn(hidden), targets)
    return sums["loss_sum"], (sums["num_tokens"], sums["num_correct"], jnp.sum(out["valid"]))


def split_microbatches(batch: Batch, k: int, mesh: Mesh | None) -> Batch:
    """(B, ...) -> (k, B/k, ...). Micro-batch i takes rows i, i+k, i+2k, ...

    Strided rather than contiguous so that each device's rows stay on that
    device (a contiguous split would put a whole micro-batch on a few devices).
    """
    def one(x):
        b = x.shape[0]
        y = jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
        if mesh is not None:
            axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
            y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, axes)))
        return y
    return jax.tree.map(one, batch)


def budget_index(rng: jax.Array, step: jax.Array, num_budgets: int, probs: Sequence[float] = ()) -> jax.Array:
    """The step's Matryoshka budget (index), a pure function of (run key, step): uniform, or by `probs`."""
    return recipe_lib.budget_index(rng, step, num_budgets, probs)


def _distill_sums(model: LlavaMini, params: dict, batch: Batch, budget: int, teacher: int,
                  weight: float) -> tuple[jax.Array, tuple]:
    """`_loss_sums` at `budget` plus `weight` x the summed KL from the `teacher` budget's answer
    distribution (stop-gradient) on the supervised positions. Full logits (B, L, V) of both: the two
    sequences differ in length by the vision tokens, and the supervised positions of each, gathered in
    order, are the same text tokens."""
    student = model.apply({"params": params}, batch, budget)
    t_out = model.apply({"params": params}, batch, teacher)
    s_targets = targets_from_labels(batch["labels"], student["text_index"])
    t_targets = targets_from_labels(batch["labels"], t_out["text_index"])
    k = s_targets.shape[1]
    s_logits, s_t = first_supervised(student["logits"], s_targets, k)
    t_logits, _ = first_supervised(jax.lax.stop_gradient(t_out["logits"]), t_targets, k)
    sums = token_loss(student["logits"], s_targets)
    kl = recipe_lib.distill_kl_sum(s_logits, t_logits, s_t != IGNORE_INDEX)
    return sums["loss_sum"] + weight * kl, (sums["num_tokens"], sums["num_correct"], jnp.sum(student["valid"]))


def _scale_loss(sums: tuple[jax.Array, Any], scale: float) -> tuple[jax.Array, Any]:
    """(loss sum, counts) with the loss sum scaled (the counts, the loss's denominator, untouched)."""
    return (sums[0] * scale if scale != 1.0 else sums[0]), sums[1]


def make_train_step(model: LlavaMini, tx: optax.GradientTransformation, parts: Sequence[str],
                    budgets: Sequence[int], grad_accum: int, schedules: dict[str, Schedule],
                    mesh: Mesh | None = None, rules: Sequence[tuple[str, Any]] = (),
                    all_budgets: bool = False,
                    recipe: MatryoshkaRecipe | None = None) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """Builds `train_step(state, batch) -> (new_state, metrics)` (not jitted).

    tx: the `make_optimizer` transformation (its state must be an `optax.ApplyIfFiniteState`).
    all_budgets: train every budget each step (loss = mean over budgets) instead of sampling one.
    recipe: how the budgets train (`mmlm.train.recipe`; overrides `all_budgets`); None = uniform draws.
    """
    budgets = tuple(int(b) for b in budgets)
    recipe = recipe or MatryoshkaRecipe(loss="all" if all_budgets else "sample")
    all_budgets = recipe.all_budgets and len(budgets) > 1
    per_step = len(budgets) if all_budgets else 1  # budgets whose sums add up in one step
    probs = recipe.probs if len(budgets) > 1 else ()
    # "all" with weights: budget i's sums scaled by n x w_i, so / (n x supervised tokens) is the weighted mean.
    scales = [len(budgets) * w for w in recipe.weights] if all_budgets and recipe.weights else None

    def loss_for(train_params, frozen, mb, idx):
        params = {**train_params, **frozen}  # gradients are taken w.r.t. train_params only
        branches = [functools.partial(_loss_sums, model, budget=m) for m in budgets]
        if recipe.distill and len(budgets) > 1:  # every budget but the largest learns from the largest too
            branches = [functools.partial(_distill_sums, model, budget=m, teacher=budgets[-1],
                                          weight=recipe.distill_weight) for m in budgets[:-1]] + branches[-1:]
        if recipe.with_largest and len(budgets) > 1:  # the largest budget's sums added to the drawn one's
            top = branches[-1]
            pair = [(1.0, 1.0)] * (len(budgets) - 1)
            if recipe.weights:  # loss sums scaled by 2 w / (w_drawn + w_largest): / (2 x tokens) is the weighted mean
                wt = recipe.weights[-1]
                pair = [(2 * w / (w + wt), 2 * wt / (w + wt)) for w in recipe.weights[:-1]]
            branches = [lambda p, b, f=f, s=s: jax.tree.map(jnp.add, _scale_loss(f(p, b), s[0]),
                                                            _scale_loss(top(p, b), s[1]))
                        for f, s in zip(branches[:-1], pair)] + [top]
        if all_budgets:  # summed sums: / (budgets x supervised tokens) below is the mean of the budgets' losses
            sums = [f(params, mb) for f in branches]
            if scales:
                sums = [(s * l, aux) for (l, aux), s in zip(sums, scales)]
            return jax.tree.map(lambda *xs: sum(xs), *sums)
        if len(branches) == 1:
            return branches[0](params, mb)
        return jax.lax.switch(idx, [lambda p, b, f=f: f(p, b) for f in branches], params, mb)

    grad_fn = jax.value_and_grad(loss_for, has_aux=True)

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        if mesh is None:
            return _step(state, batch)
        # The mesh in context lets kernels without a GSPMD rule (Pallas) shard_map over the batch axes;
        # with the rules it also activates the models' activation sharding constraints.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules_tuple(rules)):
            return _step(state, batch)

    def _step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        params = state["params"]
        train_params, frozen = split_trainable(params, parts)
        idx = budget_index(state["rng"], state["step"], len(budgets), probs)
        if grad_accum == 1:
            (loss_sum, (ntok, ncorrect, nseq)), grads = grad_fn(train_params, frozen, batch, idx)
        else:
            micro = split_microbatches(batch, grad_accum, mesh)

            def body(carry, mb):
                g_acc, l_acc, n_acc, c_acc, s_acc = carry
                (l, (n, c, s)), g = grad_fn(train_params, frozen, mb, idx)
                g_acc = jax.tree.map(jnp.add, g_acc, g)
                return (g_acc, l_acc + l, n_acc + n, c_acc + c, s_acc + s), None

            zero = jnp.zeros((), jnp.float32)
            init = (zeros_for(train_params), zero, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                    jnp.zeros((), jnp.int32))
            (grads, loss_sum, ntok, ncorrect, nseq), _ = jax.lax.scan(body, init, micro)
        denom = jnp.maximum(ntok, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        full_grads = {**grads, **zeros_for(frozen)}
        updates, new_opt = tx.update(full_grads, state["opt_state"], params)
        new_train = optax.apply_updates(train_params, {k: updates[k] for k in train_params})
        finite = jnp.isfinite(loss) & new_opt.last_finite
        new_state = {
            "step": state["step"] + 1,
            "params": {**new_train, **frozen},
            "opt_state": new_opt,
            "rng": state["rng"],
        }
        metrics = {
            "loss": loss,
            "token_accuracy": ncorrect.astype(jnp.float32) / denom,
            "grad_norm": grad_norm,
            "supervised_tokens": ntok // (jnp.where(idx == len(budgets) - 1, 1, 2) if recipe.with_largest and
                                          len(budgets) > 1 else per_step),
            "tokens": nseq,  # LLM input tokens processed (every budget's, with all_budgets)
            "budget": jnp.zeros((), jnp.int32) if all_budgets else jnp.asarray(budgets, jnp.int32)[idx],  # 0: all
            "finite": finite.astype(jnp.int32),
        }
        for part, sched in schedules.items():
            metrics[f"lr/{part}"] = jnp.asarray(sched(state["step"]), jnp.float32)
        return new_state, metrics

    return train_step


def make_eval_step(model: LlavaMini) -> Callable[..., dict[str, jax.Array]]:
    """`eval_step(params, batch, budget)` -> sums for eval/loss and eval/token_accuracy (budget static).

    Every supervised position counts (held-out rows may be longer than `model.loss_positions` allows).
    """

    def eval_step(params: dict, batch: Batch, budget: int) -> dict[str, jax.Array]:
        loss_sum, (ntok, ncorrect, _) = _loss_sums(model, params, batch, budget, all_positions=True)
        return {"loss_sum": loss_sum, "num_tokens": ntok, "num_correct": ncorrect}

    return eval_step
