"""`num_vision_tokens=auto`: a per-image-and-question budget chosen by a confidence cascade.

A Matryoshka model's budgets are nested (budget m uses the first m compressor queries, or pools all M
of them: `model.compressor.nesting`), so one model can answer at any of them. The cascade answers at
the smallest trained budget and escalates to the next one while the probability of the first answer
token (greedy: the largest softmax probability after the prompt) is below a threshold; the largest
budget answers whatever is left. The vision tower runs once per image (`with_vision_features`): an
escalation costs the LLM's prefill at the next budget (and the compressor's query rows at that budget).

The answer at the budget the cascade stops at is the fixed-budget answer at that budget: the same
greedy generation (`mmlm.infer.generate.generate`) on the same batch. `cascade_stops` runs the cascade on
a batch, `generate_cascade` answers a batch with it (lmms-eval's `num_vision_tokens=auto`), and
`cascade_prefill` runs it for one request with generation's own prefill, so that decoding continues from
the budget it stops at (`mmlm chat`, the server).

`calibrate_threshold` picks the threshold on calibration questions (drawn from the training data,
never the evaluation questions: `check_disjoint`), from the per-budget confidences and scores.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmlm.errors import UserError
from mmlm.models.config import ModelConfig
from mmlm.models.llama import init_cache
from mmlm.models.llava_mini import LlavaMini

AUTO = "auto"  # the --num_vision_tokens value that selects the cascade
DEFAULT_THRESHOLD = 0.5  # first-token probability below which the cascade escalates (uncalibrated default)
THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.97, 0.99)  # calibration candidates


def check_threshold(threshold: float, flag: str = "--auto_threshold") -> float:
    """The threshold, or a `UserError` when it is not strictly between 0 and 1."""
    t = float(threshold)
    if not (0.0 < t < 1.0):  # NaN fails too
        raise UserError(f"{flag} {threshold}: must be strictly between 0 and 1 (the first answer token's "
                        "probability below which the cascade escalates to the next budget), e.g. 0.5")
    return t


def cascade_budgets(cfg: ModelConfig) -> tuple[int, ...]:
    """The budgets the cascade steps through: the model's trained Matryoshka budgets, smallest first."""
    if cfg.mode == "llava_mini" and cfg.compressor.matryoshka and len(set(cfg.compressor.budgets)) > 1:
        return tuple(sorted(set(int(b) for b in cfg.compressor.budgets)))
    raise UserError(f"num_vision_tokens=auto needs a Matryoshka model (several nested budgets in "
                    f"model.compressor.budgets); this {cfg.mode} model supports only "
                    f"{list(cfg.supported_budgets)}: give one of those instead")


def last_prompt_state(model: LlavaMini, embeds: jax.Array, positions: jax.Array, valid: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """Generation's prefill up to the first answer token: the LLM's final hidden state after the last prompt
    token (B, D) and the next-token logits (B, V), both fp32 (a `model.apply` method)."""
    cache = init_cache(model.cfg.llm, embeds.shape[0], embeds.shape[1], model.cfg.compute_dtype,
                       per_layer=not model.cfg.scan_layers)
    hidden, _ = model.llm(embeds, positions, valid, cache=cache, cache_index=0, return_hidden=True)
    last = hidden[:, -1]
    return last.astype(jnp.float32), model.llm.logits(last).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "num_vision_tokens"))
def first_token_confidence(cfg: ModelConfig, params: Any, batch: dict[str, Any], num_vision_tokens: int) -> jax.Array:
    """(B,) probability of the greedy first answer token at `num_vision_tokens` (the prefill of generation:
    prompts left-aligned, the next-token distribution after the last prompt token)."""
    model = LlavaMini(cfg)
    variables = {"params": params}
    inputs = model.apply(variables, batch, num_vision_tokens, "left", method=LlavaMini.build_llm_inputs)
    _, logits = model.apply(variables, inputs["embeds"], inputs["positions"], inputs["valid"],
                            method=last_prompt_state)
    return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)


def confidences(cfg: ModelConfig, params: Any, batch: dict[str, Any], budgets: Sequence[int]) -> np.ndarray:
    """(B, K) first-token probabilities at each budget (the batch should carry `vision_features`)."""
    params = nn.unbox(params)
    return np.stack([np.asarray(first_token_confidence(cfg, params, batch, int(m))) for m in budgets], axis=1)


def stop_index(conf: np.ndarray, threshold: float) -> np.ndarray:
    """Per row of `conf` (n, K): the first budget whose confidence reaches `threshold`, else the last (K-1)."""
    conf = np.asarray(conf, np.float64)  # compared in float64 wherever the cascade runs (`cascade_stops`)
    ok = conf >= float(threshold)
    ok[:, -1] = True
    return np.argmax(ok, axis=1)


def prefill_flops(cfg: ModelConfig, text_tokens: int, budgets: Sequence[int], stop: int) -> float:
    """Analytic matmul FLOPs of a cascade that stopped at budgets[stop]: the vision tower once, then for
    every budget tried the rest of the prefill (compressor rows, projector, pre-fusion, LLM, LM head)."""
    from mmlm.models.flops import analytic_flops, make_workload

    total = 0.0
    for k, m in enumerate(budgets[: stop + 1]):
        f = analytic_flops(cfg, make_workload(cfg, text_tokens, int(m)))
        total += f["total"] - (f["vision"] if k else 0)
    return float(total)


@dataclasses.dataclass
class CascadeSummary:
    """The cascade's outcome over questions (one threshold)."""

    threshold: float
    accuracy: float
    mean_vision_tokens: float
    histogram: dict[int, int]  # budget -> questions answered there
    mean_flops: float  # analytic prefill FLOPs per question, repeated prefills included


def summarize(conf: np.ndarray, correct: np.ndarray, budgets: Sequence[int], threshold: float,
              flops_at_stop: Sequence[float]) -> CascadeSummary:
    """The cascade at `threshold` from per-budget confidences and scores, both (n, K); `flops_at_stop[k]`:
    a question's FLOPs when the cascade stops at budget k."""
    return dataclasses.replace(summarize_stops(stop_index(conf, threshold), correct, budgets, flops_at_stop),
                               threshold=float(threshold))


def summarize_stops(stop: np.ndarray, correct: np.ndarray, budgets: Sequence[int],
                    flops_at_stop: Sequence[float]) -> CascadeSummary:
    """The outcome of any budget policy from the budget index each question stopped at (n,) and the scores
    (n, K) (its threshold field is NaN: the policy may have none)."""
    stop = np.asarray(stop, int)
    n = max(len(stop), 1)
    chosen = np.asarray(budgets)[stop]
    return CascadeSummary(
        threshold=float("nan"),
        accuracy=float(np.asarray(correct, float)[np.arange(len(stop)), stop].sum() / n),
        mean_vision_tokens=float(chosen.sum() / n),
        histogram={int(m): int((chosen == m).sum()) for m in budgets},
        mean_flops=float(np.asarray(flops_at_stop, float)[stop].sum() / n))


def calibrate_threshold(conf: np.ndarray, correct: np.ndarray, budgets: Sequence[int], tolerance: float = 0.01,
                        grid: Sequence[float] = THRESHOLD_GRID) -> float:
    """The threshold for calibration questions with confidences and scores (n, K): the one with the fewest
    mean vision tokens among those whose accuracy is within `tolerance` of the best on `grid`."""
    if len(conf) == 0:
        raise UserError("no calibration questions: give a non-empty --calibration_data file")
    zero = [0.0] * len(budgets)
    return cheapest_knob([(t, summarize(conf, correct, budgets, t, zero)) for t in sorted(grid)], tolerance)


def cheapest_knob(runs: Sequence[tuple[float, CascadeSummary]], tolerance: float) -> float:
    """The knob of a policy's calibration runs [(knob, outcome)] with the fewest mean vision tokens among
    those within `tolerance` of the best accuracy; on a tie, the one listed first (callers list the knob
    that escalates least first)."""
    best = max(r.accuracy for _, r in runs)
    ok = [(r.mean_vision_tokens, i) for i, (_, r) in enumerate(runs) if r.accuracy >= best - tolerance]
    return runs[min(ok)[1]][0]


def check_disjoint(calibration: Sequence[dict[str, Any]], evaluation: Sequence[dict[str, Any]]) -> None:
    """A `UserError` when a calibration question is also an evaluation question (same question_id, or the
    same image with the same text): the threshold must not be fitted on the questions it is scored on."""
    def keys(rows):
        ids = {str(r["question_id"]) for r in rows}
        pairs = {(str(r.get("image", r.get("video", ""))), str(r["text"])) for r in rows}
        return ids, pairs

    (ci, cp), (ei, ep) = keys(calibration), keys(evaluation)
    both = sorted(ci & ei)[:3] or [f"{img} / {text!r}" for img, text in sorted(cp & ep)[:3]]
    if both:
        raise UserError(f"the calibration questions overlap the evaluation questions ({', '.join(both)}, ...): "
                        "calibrate on questions drawn from the training data (e.g. a synthetic build's "
                        "raw/train_questions.jsonl), never on the questions being scored")


def escalate(budgets: Sequence[int], threshold: float, batch_rows: int, rows: int | None,
             measure: Callable[[int], tuple[Any, Any]],
             on_stop: Callable[[int, np.ndarray, Any], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The cascade's escalation, whatever each budget's step computes: `measure(m)` -> (confidences (B,),
    anything) runs per budget, smallest first, while one of the first `rows` rows (default: all; the rest
    are padding) is below `threshold`; `on_stop(k, stopping (B,) bool, what measure(budgets[k]) returned)`
    hears the rows that stop at budget k (the largest takes every row left). Returns per row the index it
    stopped at (B,) and the confidences seen (B, K) float64, NaN past each row's stop."""
    n = batch_rows if rows is None else int(rows)
    conf = np.full((batch_rows, len(budgets)), np.nan)
    stop = np.full(batch_rows, len(budgets) - 1)
    going = np.ones(batch_rows, bool)
    for k, m in enumerate(budgets):
        c, out = measure(int(m))
        c = np.asarray(c, np.float64)  # compared in float64, as `stop_index` does
        conf[going, k] = c[going]
        here = going & ((c >= float(threshold)) | (k == len(budgets) - 1))
        stop[here] = k
        going &= ~here
        if on_stop is not None and here[:n].any():
            on_stop(k, here, out)
        if not going[:n].any():
            break
    return stop, conf


def cascade_stops(cfg: ModelConfig, params: Any, batch: dict[str, Any], threshold: float,
                  budgets: Sequence[int], rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The cascade on a batch: per row the index into `budgets` it stops at (B,), and the confidences it
    saw (B, K) float64, NaN past each row's stop (`escalate`).

    The batch should carry `vision_features` (`with_vision_features`: the vision tower once). The next
    budget's prefill runs only while one of the first `rows` rows (default: all; the rest are padding)
    is still below `threshold`; a row's stop is `stop_index` of its confidences.
    """
    params = nn.unbox(params)
    b = int(np.asarray(batch["input_ids"]).shape[0])
    return escalate(budgets, threshold, b, rows, lambda m: (first_token_confidence(cfg, params, batch, m), None))


def generate_cascade(cfg: ModelConfig, params: Any, batch: dict[str, Any], threshold: float, *,
                     budgets: Sequence[int] | None = None, rows: int | None = None, max_new_tokens: int,
                     eos_id: int | Sequence[int], temperature: float = 0.0, top_p: float = 1.0,
                     rng: jax.Array | None = None, pad_id: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batched generation at the budget the cascade chooses per row.

    Args:
      batch: as `mmlm.infer.generate.generate` takes it (B rows, the first `rows` real).
      threshold: first-token probability below which a row escalates to the next budget.
      budgets: the cascade's budgets, smallest first (default `cascade_budgets(cfg)`).
      max_new_tokens, eos_id, temperature, top_p, rng, pad_id: as `generate` takes them.

    Returns:
      tokens (B, max_new_tokens) and lengths (B,) as `generate` returns them, the budget each row
      answered at (B,) (0 for a batch without media: the budget changes nothing, no cascade runs), and
      the confidences seen (B, K), NaN past each row's stop.

    The vision tower runs once. Each budget tried is one prefill of generation (`prefill_with_confidence`),
    and where rows stop the batch decodes from it: each row keeps the generation at its own budget, exactly
    the fixed-budget answer there, with no prefill run twice.
    """
    from mmlm.infer.generate import decode_loop_jit, generate, sampling_params, with_vision_features

    budgets = tuple(int(m) for m in (budgets or cascade_budgets(cfg)))
    b = int(np.asarray(batch["input_ids"]).shape[0])
    kw = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature, top_p=top_p, rng=rng,
              pad_id=pad_id)
    if "images" not in batch:
        tokens, lengths = generate(cfg, params, batch, **kw)
        return tokens, lengths, np.zeros(b, int), np.full((b, len(budgets)), np.nan)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    params = nn.unbox(params)
    sp, greedy = sampling_params(temperature, top_p, eos_id, pad_id)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    batch = with_vision_features(cfg, params, batch)
    answers: dict[str, np.ndarray] = {}
    prefill_at = functools.partial(prefill_with_confidence, cfg, params, batch, sp, rng,
                                   max_new_tokens=max_new_tokens, greedy=greedy)  # budget m -> (conf, state)

    def decode(k: int, here: np.ndarray, state: Any) -> None:  # padding rows keep any answer
        state = decode_loop_jit(cfg, params, state, sp, greedy=greedy)
        for name, value in (("tokens", state.tokens), ("lengths", state.lengths)):
            value = np.asarray(value)
            answers.setdefault(name, value.copy())[here] = value[here]

    stop, conf = escalate(budgets, threshold, b, rows, lambda m: prefill_at(num_vision_tokens=m), decode)
    tokens, lengths = answers["tokens"], answers["lengths"]
    return tokens, lengths, np.asarray(budgets)[stop], conf


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "num_vision_tokens", "greedy"))
def prefill_with_confidence(cfg: ModelConfig, params: Any, batch: dict[str, Any], sp: Any, rng: jax.Array, *,
                            max_new_tokens: int, num_vision_tokens: int, greedy: bool) -> tuple[jax.Array, Any]:
    """The greedy first token's probability (B,) and generation's prefill (`mmlm.infer.generate.prefill`, the
    same arithmetic and answer token 0) it was read from."""
    from mmlm.infer.generate import prefill_logits, start_decoding

    logits, cache, key_valid, n_valid = prefill_logits(cfg, params, batch, max_new_tokens=max_new_tokens,
                                                       num_vision_tokens=num_vision_tokens)
    state = start_decoding(logits, cache, key_valid, n_valid, sp, rng, max_new_tokens=max_new_tokens, greedy=greedy)
    return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1), state


@dataclasses.dataclass
class CascadePrefill:
    """The cascade on one request: the budget it stopped at, the confidences it saw, and generation's
    prefill at that budget (a `DecodeState`), from which decoding continues."""

    budget: int
    confidences: list[float]
    state: Any


def cascade_prefill(cfg: ModelConfig, params: Any, batch: dict[str, Any], threshold: float, sp: Any,
                    rng: jax.Array, *, max_new_tokens: int, greedy: bool, budgets: Sequence[int] | None = None
                    ) -> CascadePrefill:
    """The cascade for a one-row batch (a chat turn, a server request), each budget tried by generation's
    own prefill: where it stops, the prefill is already done and decoding continues from it, which is
    exactly the fixed-budget generation there (same batch, `sp` and `rng`). An escalation costs one
    prefill; the vision tower runs once (not at all when the batch carries `vision_features`)."""
    from mmlm.infer.generate import with_vision_features

    budgets = tuple(int(m) for m in (budgets or cascade_budgets(cfg)))
    params = nn.unbox(params)
    batch = with_vision_features(cfg, params, batch)
    stopped: dict[int, Any] = {}
    prefill_at = functools.partial(prefill_with_confidence, cfg, params, batch, sp, rng,
                                   max_new_tokens=max_new_tokens, greedy=greedy)  # budget m -> (conf, state)
    stop, conf = escalate(budgets, threshold, 1, None, lambda m: prefill_at(num_vision_tokens=m),
                          lambda k, here, state: stopped.setdefault(k, state))
    k = int(stop[0])
    return CascadePrefill(budgets[k], [float(c) for c in conf[0, : k + 1]], stopped[k])


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO
