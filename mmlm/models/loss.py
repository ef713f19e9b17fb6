"""Next-token loss and accuracy on supervised positions.

`token_loss` takes the logits; `chunked_token_loss` takes the final hidden
states and the LM head, and never holds more than one chunk of logits: the
full (B, L, V) fp32 logits of a 2,048-token batch with a 32k vocabulary are
256 MiB per sample, plus as much again for their gradient.
`first_supervised` gathers the supervised positions before the head, so
that the head runs only where a target is (short answers in long rows).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmlm import IGNORE_INDEX
from mmlm.models.layers import ACT_BATCH, ACT_LENGTH, ACT_VOCAB, BTD, constrain


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


def first_supervised(hidden: jax.Array, targets: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The first `k` supervised positions of each row: hidden (B, L, D), targets (B, L) -> (B, k, D), (B, k).

    A row with fewer than k supervised positions is filled up with unsupervised
    ones (target IGNORE_INDEX, so they add nothing to the loss); a row with more
    loses the rest, so callers check the counts first (`max_supervised_tokens`).
    """
    k = min(int(k), targets.shape[1])
    order = jnp.argsort(targets == IGNORE_INDEX, axis=1, stable=True)[:, :k]  # supervised first, in order
    return (jnp.take_along_axis(hidden, order[..., None], axis=1),
            jnp.take_along_axis(targets, order, axis=1))


def max_supervised_tokens(labels: np.ndarray) -> int:
    """Host-side upper bound on the supervised positions of any row of `labels` (B, T)."""
    labels = np.asarray(labels)
    return int((labels != IGNORE_INDEX).sum(axis=1).max()) if labels.size else 0


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


def chunked_token_loss(hidden: jax.Array, targets: jax.Array, logits_fn: Callable[[jax.Array], jax.Array],
                       chunk: int) -> dict[str, jax.Array]:
    """`token_loss(logits_fn(hidden), targets)` computed `chunk` positions at a time.

    hidden: (B, L, D); targets: (B, L); logits_fn: (B, c, D) -> (B, c, V)
    logits (the LM head). A `lax.scan` over L / chunk chunks (L padded with
    ignored positions) sums the loss, token and correct counts; each chunk is
    `jax.checkpoint`ed, so the backward recomputes its logits instead of
    keeping them. Same sums as `token_loss` up to float summation order.
    """
    b, length, d = hidden.shape
    chunk = max(1, min(int(chunk), length))
    n = -(-length // chunk)
    pad = n * chunk - length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    hs = constrain(jnp.swapaxes(hidden.reshape(b, n, chunk, d), 0, 1), (None,) + BTD)
    ts = constrain(jnp.swapaxes(targets.reshape(b, n, chunk), 0, 1), (None, ACT_BATCH, ACT_LENGTH))

    @jax.checkpoint
    def sums(h, t):
        logits = constrain(logits_fn(constrain(h, BTD)), (ACT_BATCH, ACT_LENGTH, ACT_VOCAB))
        out = token_loss(logits, t)
        return out["loss_sum"], out["num_tokens"].astype(jnp.int32), out["num_correct"].astype(jnp.int32)

    def body(carry, xs):
        loss, num, correct = sums(*xs)
        return (carry[0] + loss, carry[1] + num, carry[2] + correct), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    (loss_sum, num, correct), _ = jax.lax.scan(body, init, (hs, ts))
    return {"loss_sum": loss_sum, "num_tokens": num, "num_correct": correct,
            "loss": loss_sum / jnp.maximum(num, 1)}
