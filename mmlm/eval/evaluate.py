"""Batch evaluation of a model on a LLaVA-style question JSONL across vision-token budgets.

Input lines: `{"question_id", "image" | "video" (path, relative to the media
root) or neither (text only), "text", optional "answer", "answers" (list),
"options" (list), "category"}`. Every question is answered greedily (KV-cache
generation, batched) at each budget; media are decoded once per batch, in a
background thread, and reused for all budgets.

Batches are grouped by media kind and prompt length and padded to fixed
shapes (batch size, prompt length rounded up, one frame count for all
videos), so a whole evaluation compiles a handful of programs.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mmlm.eval import metrics
from mmlm.errors import UserError
from mmlm.infer.loading import InferenceModel, check_file, encode_question, load_media

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass
class EvalQuestion:
    """One parsed question line."""

    index: int  # line order in the JSONL
    record: dict[str, Any]  # the original line
    kind: str | None  # "image", "video" or None (text only)
    media: Path | None
    prompt: list[int]  # prompt ids (one IMAGE_TOKEN_ID when there is media)
    prompt_text: str  # the question as asked (with options appended for multiple choice)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Question lines, with errors that name the line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"question file {str(path)!r} does not exist")
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            for key in ("question_id", "text"):
                if key not in row:
                    raise UserError(f"{path}:{n}: missing field {key!r} (need question_id, text, and "
                                         "image or video)")
            if "image" in row and "video" in row:
                raise UserError(f"{path}:{n}: has both 'image' and 'video'; give one")
            if row.get("options") is not None:
                if not isinstance(row["options"], list) or len(row["options"]) < 2:
                    raise UserError(f"{path}:{n}: 'options' must be a list of at least 2 choices")
                if "answer" not in row:
                    raise UserError(f"{path}:{n}: a multiple-choice question needs 'answer'")
                try:
                    metrics.gold_choice(row["answer"], row["options"])
                except ValueError as e:
                    raise UserError(f"{path}:{n}: {e}") from None
            if row.get("answers") is not None and not isinstance(row["answers"], list):
                raise UserError(f"{path}:{n}: 'answers' must be a list of strings")
            rows.append(row)
    if not rows:
        raise UserError(f"question file {str(path)!r} holds no questions")
    return rows


def question_prompt_text(row: dict[str, Any], append_options: bool) -> str:
    """The text asked: the question, plus lettered options for multiple choice (LLaVA's MC prompt)."""
    text = str(row["text"])
    options = row.get("options")
    if options and append_options:
        lines = [f"{metrics.LETTERS[i]}. {metrics.option_text(o)}" for i, o in enumerate(options)]
        text = "\n".join([text] + lines + [MC_INSTRUCTION])
    return text


def prepare_questions(im: InferenceModel, rows: Sequence[dict[str, Any]], media_root: str | os.PathLike,
                      video_root: str | os.PathLike | None = None, append_options: bool = True
                      ) -> list[EvalQuestion]:
    """Parses lines into prompts and checks every media file exists (before any compute)."""
    out = []
    for i, row in enumerate(rows):
        kind = "image" if "image" in row else "video" if "video" in row else None
        media = None
        if kind is not None:
            root = Path(video_root if (kind == "video" and video_root) else media_root)
            media = root / str(row[kind])
            try:
                check_file(media, kind)
            except UserError as e:
                raise UserError(f"question {row['question_id']!r}: {e} (media paths are relative to "
                                     f"--images {str(media_root)!r})") from None
        text = question_prompt_text(row, append_options)
        try:
            prompt = encode_question(im, text, kind is not None)
        except ValueError as e:
            raise UserError(f"question {row['question_id']!r}: {e}") from None
        out.append(EvalQuestion(i, dict(row), kind, media, prompt, text))
    return out


def plan_batches(questions: Sequence[EvalQuestion], batch_size: int) -> list[list[EvalQuestion]]:
    """Groups questions by media kind, then by prompt length, into batches of at most `batch_size`."""
    order = {"image": 0, "video": 1, None: 2}
    ranked = sorted(questions, key=lambda q: (order[q.kind], len(q.prompt), q.index))
    batches: list[list[EvalQuestion]] = []
    for kind in ("image", "video", None):
        group = [q for q in ranked if q.kind == kind]
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


def _load_batch(im: InferenceModel, batch: Sequence[EvalQuestion], max_frames: int | None
                ) -> list[np.ndarray | None]:
    pixels = []
    for q in batch:
        if q.media is None:
            pixels.append(None)
            continue
        try:
            pixels.append(load_media(im, q.media, q.kind, max_frames))
        except UserError as e:
            raise UserError(f"question {q.record['question_id']!r}: {e}") from None
    return pixels


@dataclasses.dataclass
class EvalResult:
    rows: list[dict[str, Any]]  # one per budget
    answers: dict[int, list[dict[str, Any]]]  # budget -> answer lines in question order


def evaluate(im: InferenceModel, questions: Sequence[EvalQuestion], budgets: Sequence[int | None], *,
             batch_size: int = 16, max_new_tokens: int = 16, max_frames: int | None = None,
             progress: bool = True, on_batch: Callable[[int], None] | None = None) -> EvalResult:
    """Answers every question at every budget; returns metric rows and answer lines."""
    from tqdm import tqdm

    from mmlm.infer.batching import make_batch
    from mmlm.infer.generate import generate, trim_answer

    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    ms = [im.budget(b) for b in budgets]
    frames = max_frames or im.max_frames
    batches = plan_batches(questions, batch_size)
    preds: dict[int, dict[int, str]] = {m: {} for m in ms}
    bar = tqdm(total=len(questions) * len(ms), desc="eval", unit="q", disable=not progress)
    with cf.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_load_batch, im, batches[0], max_frames) if batches else None
        for bi, chunk in enumerate(batches):
            pixels = future.result()
            if bi + 1 < len(batches):  # decode the next batch's media while this one runs
                future = pool.submit(_load_batch, im, batches[bi + 1], max_frames)
            video = chunk[0].kind == "video"
            batch = make_batch(im.cfg, [q.prompt for q in chunk], pixels, pad_id=im.tokenizer.pad_id,
                               pad_len_to=16, frames=frames if video else None, batch_size=batch_size)
            for m in ms:
                tokens, lengths = generate(im.cfg, im.params, batch, max_new_tokens=max_new_tokens,
                                           eos_id=im.stop_ids, num_vision_tokens=m, pad_id=im.tokenizer.pad_id)
                for j, q in enumerate(chunk):
                    preds[m][q.index] = im.tokenizer.decode(trim_answer(tokens[j], lengths[j])).strip()
                bar.update(len(chunk))
            if on_batch is not None:
                on_batch(bi)
    bar.close()
    rows, answers = [], {}
    ordered = sorted(questions, key=lambda q: q.index)
    for m in ms:
        scores, lines = [], []
        for q in ordered:
            pred = preds[m][q.index]
            s = metrics.score(pred, q.record)
            scores.append(s)
            line = {"question_id": q.record["question_id"], "prompt": q.prompt_text, "text": pred,
                    "num_vision_tokens": m}
            for key in ("answer", "answers", "category"):
                if key in q.record:
                    line[key] = q.record[key]
            line.update({k: v for k, v in s.items()})
            lines.append(line)
        row = {"num_vision_tokens": m}
        row.update(metrics.aggregate(scores, [q.record.get("category") for q in ordered]))
        rows.append(row)
        answers[m] = lines
    return EvalResult(rows, answers)


def write_results(out_dir: str | os.PathLike, result: EvalResult, extra: dict[str, Any]) -> Path:
    """OUT/answers.jsonl (first budget), OUT/answers_m{m}.jsonl (every budget), OUT/metrics.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, (m, lines) in enumerate(result.answers.items()):
        names = [f"answers_m{m}.jsonl"] + (["answers.jsonl"] if i == 0 else [])
        for name in names:
            with open(out / name, "w", encoding="utf-8") as f:
                for line in lines:
                    f.write(json.dumps(line) + "\n")
    first = result.rows[0]
    summary = {"accuracy": first["accuracy"], "vqa_accuracy": first["vqa_accuracy"],
               "mc_accuracy": first["mc_accuracy"], "num_vision_tokens": first["num_vision_tokens"],
               "count": first["count"], "rows": result.rows}
    summary.update(extra)
    path = out / "metrics.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path
