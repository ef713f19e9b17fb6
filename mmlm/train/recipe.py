"""How a train step trains a Matryoshka model's budgets (`train.matryoshka_loss` and its knobs).

* `"sample"`: one budget per step, drawn from the step key: uniformly (MQT), or with
  `train.matryoshka_probs` (one probability per budget, smallest budget first), e.g. weighted toward
  the largest budget, the one a uniform draw trains least for its difficulty.
* `"all"`: every budget on every batch (M3); the loss is the mean of the budgets' losses, or their
  weighted mean with `train.matryoshka_weights`.
* `"distill"`: one budget per step as `"sample"` draws it; a draw below the largest budget also runs the
  largest budget forward on the same batch (stop-gradient) and adds `train.distill_weight` times the
  KL divergence from that answer distribution to the drawn budget's on every supervised position (the
  nested budgets' self-distillation of MatFormer and Matryoshka representation learning). A step that
  draws the largest budget is a plain `"sample"` step. The teacher costs one forward of the largest
  budget, no backward.
* `"largest"`: every step trains the largest budget and, beside it, one budget drawn as `"sample"` draws
  it (with `train.matryoshka_probs`); the loss is the mean of the two (the largest alone when it is
  drawn). The largest budget, the one that needs the most steps, trains on every batch, as a
  fixed-budget model does, and the smaller ones ride along on a share of the steps: a step costs the
  largest budget's step plus the drawn one's. With `train.matryoshka_weights` the loss of a step that
  draws budget i is the weighted mean (w_i L_i + w_largest L_largest) / (w_i + w_largest).

`train_run_flops` is the analytic model-FLOPs count of a whole training run from its config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MatryoshkaRecipe:
    """The Matryoshka training recipe of a run; `budgets` sorted ascending, probs / weights aligned to them."""

    loss: str = "sample"
    probs: tuple[float, ...] = ()    # "sample" / "distill": draw probabilities (normalised); () = uniform
    weights: tuple[float, ...] = ()  # "all" / "largest": loss weights (normalised to sum 1); () = the plain mean
    distill_weight: float = 1.0      # "distill": weight of the KL term next to the cross-entropy

    @property
    def all_budgets(self) -> bool:
        return self.loss == "all"

    @property
    def distill(self) -> bool:
        return self.loss == "distill"

    @property
    def with_largest(self) -> bool:
        return self.loss == "largest"


def recipe_from_config(config: Any) -> MatryoshkaRecipe:
    """The recipe of `config.train` (knobs a config lacks take their defaults)."""
    t = config.train
    norm = lambda xs: tuple(float(x) / sum(float(y) for y in xs) for x in xs) if xs else ()
    return MatryoshkaRecipe(loss=str(t.get("matryoshka_loss", "sample")),
                            probs=norm(tuple(t.get("matryoshka_probs", ()) or ())),
                            weights=norm(tuple(t.get("matryoshka_weights", ()) or ())),
                            distill_weight=float(t.get("distill_weight", 1.0)))


def budget_index(rng: jax.Array, step: jax.Array, num_budgets: int, probs: Sequence[float] = ()) -> jax.Array:
    """The step's Matryoshka budget (index), a pure function of (run key, step): uniform, or by `probs`."""
    if num_budgets == 1:
        return jnp.zeros((), jnp.int32)
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    if probs:
        return jax.random.categorical(key, jnp.log(jnp.asarray(probs, jnp.float32))).astype(jnp.int32)
    return jax.random.randint(key, (), 0, num_budgets, dtype=jnp.int32)


def distill_kl_sum(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over masked positions of KL(teacher || student); logits (B, k, V) aligned, mask (B, k).

    The teacher is a constant (stop-gradient): only the student receives gradients.
    """
    t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return jnp.sum(jnp.where(mask, kl, 0.0))


def train_run_flops(config: Any, steps: int | None = None) -> float:
    """Analytic model FLOPs of every training step of the run `config` describes (forward + backward of
    every budget the recipe trains, teacher forwards included, and the ViT pretraining steps), as the
    trainer's MFU counts them (`mmlm.models.flops.train_step_flops`).

    Batches are `data.batch_size` x `data.max_text_len` tokens (the trainer's shape without
    `data.length_buckets`; with buckets the count is an upper bound), one image per sample.
    """
    from mmlm.models.config import model_config_from_dict
    from mmlm.models.flops import train_step_flops, vision_pretrain_step_flops
    from mmlm.train.trainer import training_budgets

    cfg = model_config_from_dict(config.model)
    recipe = recipe_from_config(config)
    budgets = training_budgets(cfg)
    steps = int(config.train.steps) if steps is None else int(steps)
    per_step = train_step_flops(cfg, batch_size=int(config.data.batch_size), text_len=int(config.data.max_text_len),
                                frames=1, trainable=tuple(config.train.trainable), budgets=budgets,
                                all_budgets=recipe.all_budgets, budget_probs=recipe.probs or None,
                                distill=recipe.distill, with_largest=recipe.with_largest)["total"]
    total = steps * per_step
    vp = config.train.get("vision_pretrain")
    if vp is not None and int(vp.steps) > 0:
        from mmlm.data import synth

        grid = cfg.vision.image_size // cfg.vision.patch_size
        classes = len(synth.COLORS) + 1 + len(synth.SHAPES) + 1 + 2 * grid
        total += int(vp.steps) * vision_pretrain_step_flops(cfg, batch_size=int(vp.batch_size), num_classes=classes)
    return float(total)
