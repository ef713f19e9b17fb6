"""A learned budget policy for `num_vision_tokens=auto`: a small head predicts which budget a question needs.

The confidence cascade (`mmlm.infer.cascade`) escalates on one number, the greedy first answer token's
probability. The head reads what that number comes from: the LLM's final hidden state at the last prompt
position (B, D) at the budget just answered, with the first token's top-two probabilities and the entropy
of its distribution (`state_features`, (B, D + 3)). From it, one logistic output per cascade budget
predicts whether the greedy answer at that budget would be right. The head at budget k (one per budget
but the largest) stops a question there when its predicted accuracy at k is within `margin` of its
prediction for the largest budget (escalating would gain less than `margin`); else the question goes on
to the next budget, whose own head reads the state there. The costs are the cascade's: the vision tower
once, a prefill per budget tried; the head adds (D + 3) x K multiply-adds per budget tried.

The heads are fitted on calibration questions drawn from the training data (never the evaluated ones:
`cascade.check_disjoint`), and the margin is calibrated on calibration questions the heads were not
fitted on, with the cascade's rule: the fewest mean vision tokens within `tolerance` of the best accuracy.
Logistic regression is a few lines of optax here, so no extra dependency is needed for it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmlm.errors import UserError
from mmlm.infer import cascade
from mmlm.models.config import ModelConfig
from mmlm.models.llava_mini import LlavaMini

MARGIN_GRID = tuple(round(0.01 * i, 2) for i in range(-10, 61))  # calibration candidates (accuracy points / 100)


@functools.partial(jax.jit, static_argnames=("cfg", "num_vision_tokens"))
def state_features(cfg: ModelConfig, params: Any, batch: dict[str, Any], num_vision_tokens: int) -> jax.Array:
    """(B, D + 3) features at `num_vision_tokens`: the LLM's final hidden state after the last prompt token
    (prompts left-aligned, as generation's prefill sees them), then the greedy first token's probability,
    the runner-up's, and the entropy of the next-token distribution (nats). The batch should carry
    `vision_features` (`mmlm.infer.generate.with_vision_features`)."""
    model = LlavaMini(cfg)
    variables = {"params": params}
    inputs = model.apply(variables, batch, num_vision_tokens, "left", method=LlavaMini.build_llm_inputs)
    hidden, logits = model.apply(variables, inputs["embeds"], inputs["positions"], inputs["valid"],
                                 method=cascade.last_prompt_state)
    logp = jax.nn.log_softmax(logits, axis=-1)
    top2 = jax.lax.top_k(jnp.exp(logp), 2)[0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.concatenate([hidden, top2, entropy[:, None]], axis=-1)


def budget_features(cfg: ModelConfig, params: Any, batch: dict[str, Any], budgets: Sequence[int]) -> np.ndarray:
    """(B, K - 1, F) `state_features` at every cascade budget but the largest (where no head decides)."""
    params = nn.unbox(params)
    return np.stack([np.asarray(state_features(cfg, params, batch, int(m))) for m in budgets[:-1]], axis=1)


class BudgetHead(nn.Module):
    """Standardised features (B, F) -> (B, K) logits: will the answer at each of the K budgets be right?"""

    budgets: int  # K, the cascade's budgets

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        return nn.Dense(self.budgets, name="correct")(features)


@dataclasses.dataclass
class FittedHeads:
    """One fitted head per cascade budget but the largest, with the standardisation of its features."""

    budgets: tuple[int, ...]
    mean: np.ndarray  # (K - 1, F)
    scale: np.ndarray  # (K - 1, F)
    params: list[Any]  # K - 1 BudgetHead parameter trees

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(n, K - 1, F) features -> (n, K - 1, K): per head, the predicted accuracy at every budget."""
        head = BudgetHead(len(self.budgets))
        out = [jax.nn.sigmoid(head.apply({"params": p}, (features[:, k] - self.mean[k]) / self.scale[k]))
               for k, p in enumerate(self.params)]
        return np.stack([np.asarray(o, np.float64) for o in out], axis=1)


def _fit_one(x: np.ndarray, y: np.ndarray, l2: float, steps: int, seed: int) -> Any:
    """Full-batch logistic regression of y (n, K) on standardised x (n, F), with an L2 penalty on the weights."""
    head = BudgetHead(y.shape[1])
    params = head.init(jax.random.key(seed), jnp.zeros((1, x.shape[1]), jnp.float32))["params"]
    opt = optax.adam(0.05)

    def loss(p):
        logits = head.apply({"params": p}, x)
        return optax.sigmoid_binary_cross_entropy(logits, y).mean() + l2 * jnp.sum(p["correct"]["kernel"] ** 2)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return jax.device_get(params)


def fit_heads(features: np.ndarray, correct: np.ndarray, budgets: Sequence[int], *, l2: float = 1e-3,
              steps: int = 500, seed: int = 0) -> FittedHeads:
    """The heads fitted on calibration questions: features (n, K - 1, F), correct (n, K) (exact match at
    each budget). Deterministic for a seed (full-batch Adam)."""
    features, correct = np.asarray(features, np.float32), np.asarray(correct, np.float32)
    if len(features) == 0:
        raise UserError("no calibration questions to fit the budget head on")
    mean = features.mean(axis=0)
    scale = np.maximum(features.std(axis=0), 1e-6)  # a constant feature (padding) must not divide by 0
    params = [_fit_one((features[:, k] - mean[k]) / scale[k], correct, l2, steps, seed)
              for k in range(len(budgets) - 1)]
    return FittedHeads(tuple(int(b) for b in budgets), mean, scale, params)


def stop_index(predicted: np.ndarray, margin: float) -> np.ndarray:
    """(n,) the budget index each question stops at: the first head k whose predicted accuracy at budget k
    is within `margin` of its prediction at the largest budget; else the largest. predicted: (n, K - 1, K)."""
    k_heads = predicted.shape[1]
    own = predicted[:, np.arange(k_heads), np.arange(k_heads)]  # (n, K - 1): head k's accuracy at budget k
    ok = np.concatenate([own >= predicted[:, :, -1] - float(margin), np.ones((len(predicted), 1), bool)], axis=1)
    return np.argmax(ok, axis=1)


def calibrate_margin(predicted: np.ndarray, correct: np.ndarray, budgets: Sequence[int], tolerance: float = 0.01,
                     grid: Sequence[float] = MARGIN_GRID) -> float:
    """The margin for held-out calibration questions (heads not fitted on them): the one with the fewest mean
    vision tokens among those within `tolerance` of the best accuracy on `grid` (the cascade's rule)."""
    if len(predicted) == 0:
        raise UserError("no held-out calibration questions to calibrate the budget head's margin on")
    zero = [0.0] * len(budgets)
    return cascade.cheapest_knob([(m, cascade.summarize_stops(stop_index(predicted, m), correct, budgets, zero))
                                  for m in sorted(grid, reverse=True)], tolerance)  # a larger margin escalates less


def head_flops(budgets: Sequence[int], features: int, stop: int) -> float:
    """The heads' own matmul FLOPs for a question that stopped at budgets[stop] (one head per budget tried
    below the largest)."""
    return 2.0 * features * len(budgets) * min(stop + 1, len(budgets) - 1)
