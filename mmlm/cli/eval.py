"""`mmlm eval`: answer a LLaVA-style question JSONL and score it, at one or more token budgets.

    mmlm eval --workdir /tmp/demo --data val_questions.jsonl --images DIR --out /tmp/eval
    mmlm eval --checkpoint ckpt/ --data q.jsonl --images DIR --num_vision_tokens 1,4,16,64 --out OUT
    mmlm eval --workdir W --data val.jsonl --num_vision_tokens 1,16,auto --calibration_data train.jsonl --out OUT

Writes OUT/answers.jsonl (first budget), OUT/answers_m{m}.jsonl (each
budget) and OUT/metrics.json (`accuracy` of the first budget plus one row
per budget), and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time

from mmlm.cli.common import add_model_source, number, run_command
from mmlm.errors import UserError


def _budgets(text: str) -> list[int | str]:
    from mmlm.infer.cascade import AUTO, is_auto

    try:
        values = [AUTO if is_auto(v) else int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--num_vision_tokens must be comma-separated integers such as 1,4,16, or auto; got {text!r}") from None
    if not values or any(v != AUTO and v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--num_vision_tokens needs positive integers; got {text!r}")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmlm eval",
        description="Answer every question of a LLaVA-style JSONL (question_id, image|video, text, and "
                    "optionally answer / answers / options) greedily and score the answers: exact match "
                    "after VQA normalisation, VQA soft accuracy, multiple-choice accuracy. One row per "
                    "vision-token budget.")
    add_model_source(p)
    p.add_argument("--data", required=True, help="question JSONL")
    p.add_argument("--images", default=None,
                   help="root of the image (and video) paths in the JSONL (default: the JSONL's directory)")
    p.add_argument("--videos", default=None, help="root of the video paths (default: --images)")
    p.add_argument("--out", required=True, help="output directory (answers*.jsonl, metrics.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier evaluation in --out (without it, they make the command "
                        "refuse); they stay whole until the new results are complete")
    p.add_argument("--num_vision_tokens", type=_budgets, default=None,
                   help="comma-separated budgets, e.g. 1,4,16,64 (default: the model's default budget); 'auto' "
                        "(alone or in the list) answers each question with a confidence cascade over a "
                        "Matryoshka model's budgets and reports its accuracy, mean vision tokens, budget "
                        "histogram and FLOPs")
    p.add_argument("--auto_threshold", type=float, default=None,
                   help="auto: first-answer-token probability in (0, 1) below which the cascade escalates to the "
                        "next budget (default 0.5, or calibrated with --calibration_data)")
    p.add_argument("--calibration_data", default=None,
                   help="auto: question JSONL drawn from the training data (never the evaluated questions; "
                        "checked) on which the threshold is calibrated")
    p.add_argument("--calibration_images", default=None,
                   help="root of the calibration questions' media (default: their JSONL's directory)")
    p.add_argument("--batch_size", type=number(int, 1), default=16, help="questions per generation batch (default 16)")
    p.add_argument("--max_new_tokens", type=number(int, 1), default=16, help="answer length limit (default 16)")
    p.add_argument("--max_frames", type=number(int, 1), default=None,
                   help="video frame cap (default: the model's data.max_frames)")
    p.add_argument("--fps", type=number(float, 0, low_open=True), default=None,
                   help="video sampling rate in frames per second (default: the model's data.video_fps)")
    p.add_argument("--video_chunk_frames", type=number(int, 1), default=None,
                   help="video frames encoded at once (default: the model's data.video_chunk_frames)")
    p.add_argument("--limit", type=number(int, 1), default=None, help="only the first N questions")
    p.add_argument("--no_option_prompt", action="store_true",
                   help="do not append lettered options to multiple-choice questions")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the one in the model's config)")
    p.add_argument("--template", default=None, help="conversation template (default: the model's)")
    p.add_argument("--weights", default="float", choices=("float", "int8"),
                   help="LLM weights: 'float' as stored (default) or 'int8' (LLM and pre-fusion kernels as int8 "
                        "with a per-channel scale), to measure what weight-only int8 serving costs in accuracy")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    import os

    from mmlm.eval.evaluate import (RESULT_FILES, ResultsWriter, check_output_dir, earlier_results, evaluate,
                                    prepare_questions, read_jsonl)
    from mmlm.eval.metrics import format_table
    from mmlm.infer.loading import load_inference_model
    from mmlm.safe_io import check_not_input

    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    for flag, value in (("--max_frames", args.max_frames), ("--video_chunk_frames", args.video_chunk_frames)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.fps is not None and not args.fps > 0:
        raise UserError(f"--fps must be > 0 frames per second, got {args.fps}")
    rows = read_jsonl(args.data)[: args.limit]
    media_root = args.images or os.path.dirname(os.path.abspath(args.data))
    if not os.path.isdir(media_root):
        raise UserError(f"--images {media_root!r} is not a directory")
    check_output_dir(args.out, create=False)  # a bad --out fails before the model is even loaded
    earlier = earlier_results(args.out)
    if earlier and not args.overwrite:
        raise UserError(f"--out {args.out!r} holds the results of an earlier evaluation ({', '.join(earlier[:4])}"
                        f"{' ...' if len(earlier) > 4 else ''}); pass --overwrite to replace them, or choose "
                        "another --out")
    inputs = {"--data": args.data, "--tokenizer": args.tokenizer}
    # Neither a file this run writes nor an earlier result it may remove can be an input.
    for name in {*RESULT_FILES, *earlier, *(f"answers_m{b}.jsonl" for b in args.num_vision_tokens or [])}:
        check_not_input(os.path.join(args.out, name), "--out", inputs)
    from mmlm.eval.auto import check_auto_args, run_auto

    auto = check_auto_args(args, rows)
    im = load_inference_model(workdir=args.workdir, checkpoint=args.checkpoint, step=args.step, weights=args.weights,
                              tokenizer=args.tokenizer, template=args.template)
    budgets = [b for b in args.num_vision_tokens or [None] if b != "auto"]
    for b in budgets:
        im.budget(b)  # every budget is checked before any compute
    if auto is not None:
        from mmlm.infer.cascade import cascade_budgets

        cascade_budgets(im.cfg)  # a model without Matryoshka budgets: a clear error before any compute
    escaped: list[dict] = []  # media paths outside --images / --videos: skipped and reported, never opened
    questions = prepare_questions(im, rows, media_root, args.videos, append_options=not args.no_option_prompt,
                                  skipped=escaped)
    if not questions:
        raise UserError(f"no question of {args.data!r} can be answered: " + "; ".join(
            s["reason"] for s in escaped[:3]) + (" ..." if len(escaped) > 3 else ""))
    writer = ResultsWriter(args.out, replace=bool(earlier))
    start = time.perf_counter()
    try:
        result = evaluate(im, questions, budgets, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          max_frames=args.max_frames, progress=not args.no_progress, on_answers=writer,
                          fps=args.fps, video_chunk_frames=args.video_chunk_frames) if budgets else None
    finally:
        writer.close()  # answers computed so far stay on disk, flushed
    if auto is not None:
        result = run_auto(args, im, questions, auto, result)
    seconds = time.perf_counter() - start
    result.skipped[:0] = escaped
    path = writer.finish(result, {"source": im.source, "data": os.path.abspath(args.data),
                                  "mode": im.cfg.mode, "seconds": round(seconds, 2)})
    print(format_table(result.rows))
    for row in result.rows:
        if row["num_vision_tokens"] == "auto":
            print(f"auto (threshold {row['threshold']:g}, budgets {row['cascade_budgets']}): mean vision tokens "
                  f"{row['mean_vision_tokens']:.2f}, questions per budget {row['budget_histogram']}, prefill "
                  f"{row['flops_per_question'] / 1e6:.2f} MFLOPs per question (escalations included)")
    for s in result.skipped:
        print(f"[mmlm eval] skipped: {s['reason']}", file=sys.stderr)
    answered = len(questions) + len(escaped) - len(result.skipped)
    print(f"[mmlm eval] {answered} questions x {len(result.rows)} budget(s) in {seconds:.1f} s -> {path}"
          + (f" ({len(result.skipped)} skipped: " + ", ".join(
              f"{n} {why}" for why, n in _skip_counts(result.skipped).items()) + ")" if result.skipped else ""),
          file=sys.stderr)
    return 0


def _skip_counts(skipped: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in skipped:
        why = "media path outside its root" if "path_escapes_root" in s["reason"] else "unreadable media"
        counts[why] = counts.get(why, 0) + 1
    return counts


def main(argv: list[str]) -> int:
    return run_command("eval", run, build_parser().parse_args(argv), interruptible=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
