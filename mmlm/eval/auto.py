"""`mmlm eval --num_vision_tokens auto`: the confidence cascade (`mmlm.infer.cascade`) scored on a question file.

Each question is answered by the project's evaluator (`evaluate`) at every budget of the cascade, and its
first-token confidence is taken at each (the same batches, the vision tower once per batch); the cascade's
answer is the answer at the budget it stops at, so it is exactly the fixed-budget answer there. The row
reports accuracy, the mean vision tokens used, the budget histogram, and the analytic prefill FLOPs per
question with the repeated prefills of escalations. The threshold is `--auto_threshold`, or calibrated on
`--calibration_data` (questions drawn from the training data, checked disjoint from the evaluated ones).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from mmlm.errors import UserError
from mmlm.eval.evaluate import EvalQuestion, EvalResult, evaluate, plan_batches, prepare_questions, read_jsonl
from mmlm.infer import budget_head, cascade
from mmlm.infer.loading import InferenceModel


@dataclasses.dataclass
class Scored:
    """Questions answered at every cascade budget: per-budget answer lines, confidences and correctness."""

    budgets: tuple[int, ...]
    questions: list[EvalQuestion]  # the answered ones, in question order
    lines: dict[int, list[dict[str, Any]]]  # budget -> answer lines (question order)
    conf: np.ndarray  # (n, K) first-token probability per budget
    correct: np.ndarray  # (n, K) exact match per budget
    flops_at_stop: list[np.ndarray]  # per question: (K,) prefill FLOPs when the cascade stops at budget k
    features: np.ndarray | None = None  # (n, K - 1, F) the budget head's features (`with_features`)


def score_budgets(im: InferenceModel, questions: Sequence[EvalQuestion], budgets: Sequence[int], *,
                  batch_size: int, max_new_tokens: int, max_frames: int | None = None,
                  progress: bool = False, answered: EvalResult | None = None, with_features: bool = False) -> Scored:
    """Answers and first-token confidences of every question at every budget (`answered`: an
    `evaluate` result of these questions at these budgets, reused instead of answering again); with
    `with_features` also the learned budget head's features (`mmlm.infer.budget_head.budget_features`)."""
    from mmlm.infer.batching import make_batch
    from mmlm.infer.generate import with_vision_features
    from mmlm.infer.loading import load_media

    budgets = tuple(int(m) for m in budgets)
    ev = answered or evaluate(im, questions, budgets, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              max_frames=max_frames, progress=progress)
    skipped = {s["question_id"] for s in ev.skipped}
    answered = [q for q in sorted(questions, key=lambda q: q.index) if q.record["question_id"] not in skipped]
    conf_of: dict[int, np.ndarray] = {}
    features_of: dict[int, np.ndarray] = {}
    frames = max_frames or im.max_frames
    for chunk in plan_batches([q for q in answered], batch_size):  # the evaluator's batches and shapes
        # Video files whole (not `load_batch`'s streams, which the chunked generation reads): the confidence
        # prefill takes every frame's tokens at once.
        pixels = [q.pixels if q.pixels is not None or q.media is None else load_media(im, q.media, q.kind, max_frames)
                  for q in chunk]
        video = chunk[0].kind == "video"
        batch = make_batch(im.cfg, [q.prompt for q in chunk], pixels, pad_id=im.tokenizer.pad_id, pad_len_to=16,
                           frames=frames if video else None, batch_size=batch_size)
        batch = with_vision_features(im.cfg, im.params, batch)
        c = cascade.confidences(im.cfg, im.params, batch, budgets)
        f = budget_head.budget_features(im.cfg, im.params, batch, budgets) if with_features else None
        for j, q in enumerate(chunk):
            conf_of[q.index] = c[j]
            if f is not None:
                features_of[q.index] = f[j]
    conf = np.stack([conf_of[q.index] for q in answered]) if answered else np.zeros((0, len(budgets)))
    correct = np.array([[ev.answers[m][i]["accuracy"] > 0 for m in budgets] for i in range(len(answered))],
                       bool).reshape(len(answered), len(budgets))
    cache: dict[int, np.ndarray] = {}
    flops = []
    for q in answered:
        t = max(len(q.prompt) - 1, 1)  # the <image> placeholder excluded
        if t not in cache:
            cache[t] = np.array([cascade.prefill_flops(im.cfg, t, budgets, k) for k in range(len(budgets))])
        flops.append(cache[t])
    features = np.stack([features_of[q.index] for q in answered]) if with_features and answered else None
    return Scored(budgets, answered, {m: ev.answers[m] for m in budgets}, conf, correct, flops, features)


def cascade_row(s: Scored, threshold: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The `auto` metrics row and its answer lines at `threshold`."""
    from mmlm.eval import metrics

    stop = cascade.stop_index(s.conf, threshold)
    lines = []
    for i, k in enumerate(stop):
        line = dict(s.lines[s.budgets[k]][i])
        line["confidence"] = {str(m): round(float(c), 4) for m, c in zip(s.budgets[: k + 1], s.conf[i, : k + 1])}
        lines.append(line)
    scores = [{k: line[k] for k in metrics.METRICS if k in line} for line in lines]
    row: dict[str, Any] = {"num_vision_tokens": cascade.AUTO}
    row.update(metrics.aggregate(scores, [q.record.get("category") for q in s.questions]))
    n = max(len(stop), 1)
    chosen = np.asarray(s.budgets)[stop] if len(stop) else np.zeros(0, int)
    row.update({"threshold": float(threshold), "mean_vision_tokens": float(chosen.sum() / n),
                "budget_histogram": {str(m): int((chosen == m).sum()) for m in s.budgets},
                "flops_per_question": float(sum(f[k] for f, k in zip(s.flops_at_stop, stop)) / n)})
    return row, lines


def sweep(s: Scored, grid: Sequence[float] = cascade.THRESHOLD_GRID) -> list[dict[str, Any]]:
    """Accuracy, mean vision tokens and FLOPs of the cascade at each threshold of `grid` (for plots)."""
    out = []
    for t in grid:
        row, _ = cascade_row(s, t)
        out.append({k: row[k] for k in ("threshold", "accuracy", "mean_vision_tokens", "budget_histogram",
                                        "flops_per_question")})
    return out


def calibrate(im: InferenceModel, calibration: Sequence[EvalQuestion], budgets: Sequence[int], *, batch_size: int,
              max_new_tokens: int, tolerance: float = 0.01) -> dict[str, Any]:
    """The threshold calibrated on `calibration` questions, with what it was fitted on."""
    s = score_budgets(im, calibration, budgets, batch_size=batch_size, max_new_tokens=max_new_tokens)
    t = cascade.calibrate_threshold(s.conf, s.correct, s.budgets, tolerance=tolerance)
    row, _ = cascade_row(s, t)
    return {"threshold": t, "questions": len(s.questions), "tolerance": tolerance,
            "calibration_accuracy": row["accuracy"], "calibration_mean_vision_tokens": row["mean_vision_tokens"]}


# ----------------------------------------------------------------------------- mmlm eval

def check_auto_args(args: Any, rows: list) -> list | None:
    """`mmlm eval`'s auto arguments, checked before the model loads: with auto the calibration questions
    (or [] for none), disjoint from the evaluated ones; None without auto."""
    if "auto" not in (args.num_vision_tokens or []):
        if args.auto_threshold is not None or args.calibration_data:
            raise UserError("--auto_threshold and --calibration_data go with --num_vision_tokens auto")
        return None
    if args.auto_threshold is not None and args.calibration_data:
        raise UserError("give --auto_threshold or --calibration_data (which calibrates the threshold), not both")
    if args.auto_threshold is not None:
        cascade.check_threshold(args.auto_threshold)
    if not args.calibration_data:
        return []
    calibration = read_jsonl(args.calibration_data)
    cascade.check_disjoint(calibration, rows)
    return calibration


def run_auto(args: Any, im: InferenceModel, questions: Sequence[EvalQuestion], calibration: list,
             result: EvalResult | None) -> EvalResult:
    """`mmlm eval`: the cascade's row and answers (answers_mauto.jsonl) added to `result` (or a new result)."""
    import os
    import sys

    budgets = cascade.cascade_budgets(im.cfg)
    kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    extra = {}
    threshold = args.auto_threshold if args.auto_threshold is not None else cascade.DEFAULT_THRESHOLD
    if calibration:
        root = args.calibration_images or os.path.dirname(os.path.abspath(args.calibration_data))
        cal = calibrate(im, prepare_questions(im, calibration, root, append_options=not args.no_option_prompt),
                        budgets, **kw)
        threshold, extra = cal["threshold"], {"calibration": {**cal, "data": os.path.abspath(args.calibration_data)}}
        print(f"[mmlm eval] auto: threshold {threshold} calibrated on {cal['questions']} questions of "
              f"{args.calibration_data}", file=sys.stderr)
    scored = score_budgets(im, questions, budgets, max_frames=args.max_frames, progress=not args.no_progress, **kw)
    row, lines = cascade_row(scored, threshold)
    row.update({"cascade_budgets": list(budgets), **extra})
    result = result or EvalResult([], {}, [])
    return EvalResult(result.rows + [row], {**result.answers, "auto": lines}, result.skipped)
