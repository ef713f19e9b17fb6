"""The evaluator: answers questions greedily at each vision-token budget and scores them.

Used by `mmlm eval` (a LLaVA-style question JSONL) and by the training loop
(held-out conversations, through the train package's `Evaluator`), so both report the same
metrics with the same answer normalisation (`mmlm.eval.metrics`).

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
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mmlm.eval import metrics
from mmlm.errors import UserError
from mmlm.infer.loading import InferenceModel, check_file, encode_question, load_media
from mmlm.safe_io import confined_path, signals_deferred

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
    pixels: np.ndarray | None = None  # media already decoded (F, K, H, W, 3), e.g. from the training pipeline


def read_text_lines(path: Path, what: str = "question file") -> list[str]:
    """A text file's lines: UTF-8, else Latin-1 with a warning (every byte decodes), never a traceback."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        warnings.warn(f"{what} {str(path)!r} is not UTF-8 (byte {e.start}); reading it as Latin-1", stacklevel=2)
        text = data.decode("latin-1")
    return text.splitlines()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Question lines, with errors that name the line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"question file {str(path)!r} does not exist")
    rows = []
    for n, line in enumerate(read_text_lines(p), 1):
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
                      video_root: str | os.PathLike | None = None, append_options: bool = True,
                      skipped: list[dict[str, Any]] | None = None) -> list[EvalQuestion]:
    """Parses lines into prompts and checks every media file exists (before any compute).

    A media path that leaves its root (`..`, an absolute path, a symlink
    pointing outside; `mmlm.safe_io.confined_path`) is never opened: the
    question is left out and, as `mmlm data build` does, recorded in
    `skipped` ({"question_id", "reason": "question ID: path_escapes_root: ..."});
    without a `skipped` list such a question raises `UserError`.
    """
    out = []
    for i, row in enumerate(rows):
        kind = "image" if "image" in row else "video" if "video" in row else None
        media = None
        if kind is not None:
            root = Path(video_root if (kind == "video" and video_root) else media_root)
            media = confined_path(root, str(row[kind]))
            if media is None:
                reason = (f"question {row['question_id']!r}: path_escapes_root: {kind} {str(row[kind])!r} is "
                          f"outside {str(root)!r}")
                if skipped is None:
                    raise UserError(reason)
                skipped.append({"question_id": row["question_id"], "reason": reason})
                continue
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
        if len(prompt) > im.max_text_len:  # refused before anything is allocated for it
            raise UserError(f"question {row['question_id']!r} is {len(prompt)} tokens long with its template; "
                            f"the model takes at most {im.max_text_len} (data.max_text_len): shorten it")
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


def load_batch(im: InferenceModel, batch: Sequence[EvalQuestion], max_frames: int | None,
                fps: float | None = None) -> list[Any]:
    """Each question's pixels (None for text only; a video file as an opened `VideoStream`, encoded in chunks
    later), or the `UserError` that says why its media is unreadable."""
    from mmlm.infer.chunked import open_video

    pixels: list[Any] = []
    for q in batch:
        if q.pixels is not None or q.media is None:
            pixels.append(q.pixels)
            continue
        try:
            pixels.append(open_video(im, q.media, fps=fps, max_frames=max_frames) if q.kind == "video"
                          else load_media(im, q.media, q.kind, max_frames))
        except UserError as e:
            pixels.append(UserError(f"question {q.record['question_id']!r}: {e}"))
    return pixels


@dataclasses.dataclass
class EvalResult:
    rows: list[dict[str, Any]]  # one per budget
    answers: dict[int, list[dict[str, Any]]]  # budget -> answer lines in question order
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # unreadable media, with reasons


def answer_line(q: EvalQuestion, prediction: str, m: int) -> dict[str, Any]:
    """One answers-file line: the question, the prediction, the budget and its scores."""
    line = {"question_id": q.record["question_id"], "prompt": q.prompt_text, "text": prediction,
            "num_vision_tokens": m}
    for key in ("answer", "answers", "category"):
        if key in q.record:
            line[key] = q.record[key]
    line.update(metrics.score(prediction, q.record))
    return line


def evaluate(im: InferenceModel, questions: Sequence[EvalQuestion], budgets: Sequence[int | None], *,
             batch_size: int = 16, max_new_tokens: int = 16, max_frames: int | None = None,
             progress: bool = True, on_answers: Callable[[int, list[dict[str, Any]]], None] | None = None,
             fps: float | None = None, video_chunk_frames: int | None = None) -> EvalResult:
    """Answers every question at every budget in one pass over the media; returns metric rows and answer lines.

    This is the project's one evaluator: `mmlm eval` calls it on a question
    file, the training loop on held-out conversations (the train package's `Evaluator`).
    Each batch's media are decoded once (in a background thread, while the
    previous batch is answered) and encoded by the vision tower once; both
    are reused for every budget. A question whose
    media cannot be decoded is skipped and reported in `EvalResult.skipped`
    instead of ending the run. `on_answers(m, lines)` receives each batch's
    scored answer lines as soon as they exist (for incremental writing).
    Video files are sampled at `fps` (default: the model's), capped at `max_frames` (default: the model's
    data.max_frames), and encoded `video_chunk_frames` at a time (`mmlm.infer.chunked.generate_videos`).
    """
    from tqdm import tqdm

    from mmlm.infer.batching import make_batch
    from mmlm.infer.generate import generate, trim_answer, with_vision_features

    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    ms = list(dict.fromkeys(im.budget(b) for b in budgets))  # unique, in the order given
    frames = max_frames or im.max_frames
    batches = plan_batches(questions, batch_size)
    lines: dict[int, dict[int, dict[str, Any]]] = {m: {} for m in ms}
    skipped: list[dict[str, Any]] = []
    bar = tqdm(total=len(questions) * len(ms), desc="eval", unit="q", disable=not progress)
    with cf.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(load_batch, im, batches[0], frames, fps) if batches else None
        for bi, chunk in enumerate(batches):
            loaded = future.result()
            if bi + 1 < len(batches):  # decode the next batch's media while this one runs
                future = pool.submit(load_batch, im, batches[bi + 1], frames, fps)
            for q, px in zip(chunk, loaded):
                if isinstance(px, UserError):
                    skipped.append({"question_id": q.record["question_id"], "reason": str(px)})
                    bar.update(len(ms))
            keep = [(q, px) for q, px in zip(chunk, loaded) if not isinstance(px, UserError)]
            if not keep:
                continue
            video = chunk[0].kind == "video"
            if video and not isinstance(keep[0][1], np.ndarray):  # video files: chunked encoding per video
                from mmlm.infer.chunked import generate_videos

                for m in ms:
                    tokens, lengths = generate_videos(im, [q.prompt for q, _ in keep], [v for _, v in keep],
                                                      num_vision_tokens=m, max_new_tokens=max_new_tokens,
                                                      chunk_frames=video_chunk_frames)
                    new = [answer_line(q, im.tokenizer.decode(trim_answer(tokens[j], lengths[j])).strip(), m)
                           for j, (q, _) in enumerate(keep)]
                    for line, (q, _) in zip(new, keep):
                        lines[m][q.index] = line
                    if on_answers is not None:
                        on_answers(m, new)
                    bar.update(len(keep))
                continue
            batch = make_batch(im.cfg, [q.prompt for q, _ in keep], [px for _, px in keep],
                               pad_id=im.tokenizer.pad_id, pad_len_to=16, frames=frames if video else None,
                               batch_size=batch_size)
            if len(ms) > 1:  # the ViT's features do not depend on the budget: compute them once
                batch = with_vision_features(im.cfg, im.params, batch)
            for m in ms:
                tokens, lengths = generate(im.cfg, im.params, batch, max_new_tokens=max_new_tokens,
                                           eos_id=im.stop_ids, num_vision_tokens=m, pad_id=im.tokenizer.pad_id)
                new = []
                for j, (q, _) in enumerate(keep):
                    pred = im.tokenizer.decode(trim_answer(tokens[j], lengths[j])).strip()
                    new.append(answer_line(q, pred, m))
                    lines[m][q.index] = new[-1]
                if on_answers is not None:
                    on_answers(m, new)
                bar.update(len(keep))
    bar.close()
    rows, answers = [], {}
    answered = sorted((q for q in questions if q.index in lines[ms[0]]), key=lambda q: q.index)
    for m in ms:
        ordered = [lines[m][q.index] for q in answered]
        scores = [{k: line[k] for k in metrics.METRICS if k in line} for line in ordered]
        row = {"num_vision_tokens": m}
        row.update(metrics.aggregate(scores, [q.record.get("category") for q in answered]))
        rows.append(row)
        answers[m] = ordered
    return EvalResult(rows, answers, skipped)


def check_output_dir(out_dir: str | os.PathLike, create: bool = True) -> Path:
    """Checks that `out_dir` is, or can be created as, a writable directory (creates it with `create`).

    Run before any compute so that a bad `--out` costs nothing.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out_dir)!r} exists and is not a directory; give a directory path")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out {str(out_dir)!r}: {str(existing)!r} is not a directory")
    try:  # a real write, not os.access: root passes access checks on read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".mmlm-write-test", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--out {str(out_dir)!r} is not writable ({str(existing)!r}: {e.strerror or e}); "
                        "choose another --out") from None
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".mmlm-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"--out {str(out_dir)!r} is not a writable directory ({e.strerror or e}); "
                            "choose another --out") from None
    return out


RESULT_FILES = ("answers.jsonl", "metrics.json")  # with answers_m{m}.jsonl: what an evaluation writes in OUT
PARTIAL_DIR = ".mmlm-eval-partial"  # where a replacing evaluation streams its answers until it finishes


def earlier_results(out_dir: str | os.PathLike) -> list[str]:
    """The result files of an earlier evaluation in `out_dir` (sorted names; empty if none)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.name in RESULT_FILES or (p.name.startswith("answers_m") and p.name.endswith(".jsonl")))


class ResultsWriter:
    """Writes `OUT/answers_m{m}.jsonl` line by line while an evaluation runs, then the final files.

    Lines are appended and flushed as each batch is answered, so an
    interrupted evaluation keeps every answer computed so far; `finish`
    rewrites the answer files in question order and writes `metrics.json`.
    With `replace` (OUT holds an earlier evaluation, replaced with
    --overwrite) the lines go to `OUT/.mmlm-eval-partial/` instead, and
    `finish` swaps the complete new set in at once, removing the earlier
    answer files of budgets this run did not evaluate: the earlier results
    stay whole until then and are never mixed with the new ones.
    """

    def __init__(self, out_dir: str | os.PathLike, replace: bool = False):
        self.out = check_output_dir(out_dir)
        self.replace = replace
        self.stream_dir = self.out / PARTIAL_DIR if replace else self.out
        if replace:
            shutil.rmtree(self.stream_dir, ignore_errors=True)
            self.stream_dir.mkdir()
        self._files: dict[int, Any] = {}

    def __call__(self, m: int, lines: Sequence[dict[str, Any]]) -> None:
        if m not in self._files:
            self._files[m] = open(self.stream_dir / f"answers_m{m}.jsonl", "w", encoding="utf-8")
        f = self._files[m]
        for line in lines:
            f.write(json.dumps(line) + "\n")
        f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def finish(self, result: EvalResult, extra: dict[str, Any]) -> Path:
        self.close()
        path = write_results(self.out, result, extra, replace=self.replace)
        if self.replace:
            shutil.rmtree(self.stream_dir, ignore_errors=True)
        return path


def write_results(out_dir: str | os.PathLike, result: EvalResult, extra: dict[str, Any],
                  replace: bool = False) -> Path:
    """OUT/answers.jsonl (first budget), OUT/answers_m{m}.jsonl (every budget), OUT/metrics.json.

    Every file is written completely under a temporary name first; all are
    then renamed into place in one step that signals cannot interrupt. With
    `replace`, answer files of other budgets (an earlier evaluation's) are
    removed in the same step.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts: dict[str, str] = {}
    for i, (m, lines) in enumerate(result.answers.items()):
        text = "".join(json.dumps(line) + "\n" for line in lines)
        for name in [f"answers_m{m}.jsonl"] + (["answers.jsonl"] if i == 0 else []):
            texts[name] = text
    first = result.rows[0]
    summary = {"accuracy": first["accuracy"], "vqa_accuracy": first["vqa_accuracy"],
               "mc_accuracy": first["mc_accuracy"], "num_vision_tokens": first["num_vision_tokens"],
               "count": first["count"], "rows": result.rows}
    if result.skipped:
        summary["skipped"] = result.skipped
    summary.update(extra)
    texts["metrics.json"] = json.dumps(summary, indent=2) + "\n"
    stale = [name for name in earlier_results(out) if name not in texts] if replace else []
    tmps = {}
    try:
        for name, text in texts.items():
            tmp = out / f".{name}.mmlm-tmp-{os.getpid()}"
            tmp.write_text(text, encoding="utf-8")
            tmps[tmp] = out / name
        with signals_deferred():
            for tmp, final in tmps.items():
                os.replace(tmp, final)
            for name in stale:
                os.remove(out / name)
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()
    return out / "metrics.json"
