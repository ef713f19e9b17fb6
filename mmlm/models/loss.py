"""Next-token loss and accuracy on supervised positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmlm import IGNORE_INDEX


def shift_targets(labels: jax.Array) -> jax.Array:
    """targets[:, t] = labels[:, t + 1] (the token position t must predict); last = ignore."""
    pad = jnp.full(labels.shape[:1] + (1,), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[:, 1:], pad], axis=1)


def targets_from_labels(labels: jax.Array, text_index: jax.Array) -> jax.Array:
    """Per-LLM-position targets (B, L) from the text labels (B, T) and the model's `text_index` (B, L).

    Position l predicts the label of the token at l + 1; vision slots and
    padding (text_index -1) carry no label.
    """
    gathered = jnp.take_along_axis(labels, jnp.maximum(text_index, 0), axis=1)
    return shift_targets(jnp.where(text_index >= 0, gathered, IGNORE_INDEX))


def token_loss(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """Cross-entropy over positions whose target is not IGNORE_INDEX.

    logits: (B, L, V); targets: (B, L) aligned with logits (see `shift_targets`).
    Returns sums (so callers can average over accumulation steps or hosts):
    `loss_sum`, `num_tokens`, `num_correct`, and the mean `loss`.
    """
    mask = targets != IGNORE_INDEX
    safe = jnp.where(mask, targets, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    loss_sum = jnp.sum(jnp.where(mask, ce, 0.0))
    num = jnp.sum(mask)
    correct = jnp.sum(mask & (jnp.argmax(logits, axis=-1) == safe))
    return {"loss_sum": loss_sum, "num_tokens": num, "num_correct": correct,
            "loss": loss_sum / jnp.maximum(num, 1)}
