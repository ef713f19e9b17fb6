"""The training recipe as an optax transformation.

* Parameters are grouped by the top-level key of the params tree (the
  model's parts: vision, projector, compressor, prefusion, llm).
* Trainable parts each get AdamW with their own peak learning rate and the
  shared warmup + decay schedule (`optax.multi_transform`).
* Frozen parts get `optax.set_to_zero()`: no update and no optimizer state
  (multi_transform masks every inner transform, so Adam allocates its
  moments only for the parts it updates).
* Gradients are clipped by their global norm first.
* The whole chain is wrapped in `optax.apply_if_finite`: a step whose
  gradients hold a NaN/inf is skipped (zero update, optimizer state kept)
  and recorded in the wrapper's state (`last_finite`, `total_notfinite`);
  the trainer reads `last_finite` and stops the run, so the last checkpoint
  on disk is the last good state. The wrapper never gives up and applies a
  non-finite update (`max_consecutive_errors` is the int32 maximum, which
  its saturating counter cannot exceed). The wrapper is part of the
  optimizer state's tree: a training checkpoint written before it existed
  cannot be resumed (its params still load for `mmlm eval` and `mmlm chat`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mmlm.models.config import PARTS

log = logging.getLogger(__name__)

FROZEN = "frozen"
# apply_if_finite's counter of consecutive non-finite steps saturates at the int32 maximum,
# so it never exceeds this limit: a non-finite update is never applied.
NEVER_GIVE_UP = int(jnp.iinfo(jnp.int32).max)
Schedule = Callable[[jax.Array], jax.Array]


def trainable_parts(params: Mapping[str, Any], trainable: Sequence[str]) -> tuple[str, ...]:
    """The configured trainable parts that exist in `params` (a clear error for unknown names)."""
    unknown = sorted(set(trainable) - set(PARTS))
    if unknown:
        raise ValueError(f"train.trainable names unknown part(s) {unknown}; parts are {list(PARTS)}")
    absent = [p for p in trainable if p not in params]
    if absent:
        log.info("train.trainable: model has no %s (e.g. llava15 mode has no compressor/pre-fusion); skipped",
                 absent)
    parts = tuple(p for p in PARTS if p in trainable and p in params)
    if not parts:
        raise ValueError(f"nothing to train: train.trainable={tuple(trainable)} but the model has parts "
                         f"{sorted(params)}")
    return parts


def part_labels(params: Mapping[str, Any], parts: Sequence[str]) -> dict[str, Any]:
    """Label tree for multi_transform: every leaf of part p is p if p trains, else FROZEN."""
    return {k: jax.tree.map(lambda _: (k if k in parts else FROZEN), v) for k, v in params.items()}


def lr_factor(optim: ml_collections.ConfigDict, total_steps: int) -> Schedule:
    """Schedule shape in [0, 1] (multiplied by each part's peak LR).

    Linear warmup from 0 over ceil(warmup_ratio * total_steps) steps (at most
    total_steps - 1: a 1-step run takes its step at the peak), then
    cosine / linear decay to `end_lr_ratio` at `total_steps`, or constant, or
    "wsd" (warmup-stable-decay): the peak until the last
    ceil(decay_ratio * total_steps) steps, then linear decay to `end_lr_ratio`.
    """
    total = max(int(total_steps), 1)
    warmup = min(int(math.ceil(float(optim.warmup_ratio) * total)), total - 1)  # a step left to decay over
    end = float(optim.end_lr_ratio)
    kind = optim.schedule
    if kind == "constant":
        return optax.warmup_constant_schedule(0.0, 1.0, warmup) if warmup else optax.constant_schedule(1.0)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, total, end_value=end)
    if kind == "linear":
        return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup),
                                     optax.linear_schedule(1.0, end, total - warmup)], [warmup])
    if kind == "wsd":
        ratio = float(optim.get("decay_ratio", 0.2))
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"optim.decay_ratio must be in (0, 1] for the wsd schedule; got {ratio}")
        decay = min(int(math.ceil(ratio * total)), total - warmup)
        stable = total - warmup - decay
        return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0),
                                     optax.linear_schedule(1.0, end, decay)], [warmup, warmup + stable])
    raise ValueError(f"optim.schedule must be cosine, linear, wsd or constant; got {kind!r}")


def part_schedule(optim: ml_collections.ConfigDict, part: str, total_steps: int) -> Schedule:
    peak = float(optim.learning_rate[part])
    factor = lr_factor(optim, total_steps)
    return lambda step: peak * factor(step)


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices and embeddings only (not norms, biases, or per-layer vectors).

    Scanned layers add a leading layer axis, so a stacked bias is 2-D; the
    names tell them apart.
    """
    def leaf(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        return x.ndim >= 2 and name in ("kernel", "embedding", "in_proj_kernel", "query", "position_embedding")
    return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(optim: ml_collections.ConfigDict, params: Mapping[str, Any], parts: Sequence[str],
                   total_steps: int) -> optax.GradientTransformation:
    """apply_if_finite(clip_by_global_norm -> multi_transform({part: AdamW(part LR schedule), frozen: zero})).

    The state is an `optax.ApplyIfFiniteState` whose `inner_state` is the chain's state.
    """
    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    for part in parts:
        transforms[part] = optax.adamw(
            part_schedule(optim, part, total_steps), b1=float(optim.b1), b2=float(optim.b2),
            eps=float(optim.eps), weight_decay=float(optim.weight_decay), mask=_decay_mask)
    chain = []
    if float(optim.grad_clip_norm) > 0:
        chain.append(optax.clip_by_global_norm(float(optim.grad_clip_norm)))
    chain.append(optax.multi_transform(transforms, part_labels(params, parts)))
    return optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=NEVER_GIVE_UP)


def count_state(opt_state: Any) -> int:
    """Number of scalars held by an optimizer state (frozen parts contribute none)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(opt_state) if hasattr(x, "shape")))


def split_trainable(params: Mapping[str, Any], parts: Sequence[str]) -> tuple[dict, dict]:
    """(trainable subtree, frozen subtree) by top-level part."""
    train = {k: v for k, v in params.items() if k in parts}
    frozen = {k: v for k, v in params.items() if k not in parts}
    return train, frozen


def zeros_for(tree: Any) -> Any:
    return jax.tree.map(jnp.zeros_like, tree)
