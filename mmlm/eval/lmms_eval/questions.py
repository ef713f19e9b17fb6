"""The `mmlm_questions` lmms-eval task: a question file in `mmlm eval`'s format, scored as `mmlm eval` scores it.

Environment (read when the task loads):

* `MMLM_QUESTIONS`: the question JSONL (`question_id`, `image` | `video` |
  neither, `text`, and `answer`, `answers` or `options` + `answer`; see
  `mmlm.eval.evaluate`). Required.
* `MMLM_IMAGES`: root of the media paths (default: the JSONL's directory).
* `MMLM_VIDEOS`: root of the video paths (default: `MMLM_IMAGES`).

The documents are built here from the file (no Hugging Face dataset, nothing
downloaded). Each is asked as `mmlm eval` asks it (multiple-choice options
appended with LLaVA's instruction) and its answer is scored with
`mmlm.eval.metrics.score`: `exact_match` is `mmlm eval`'s `accuracy` (exact
match after VQA normalisation; for multiple choice, naming the right option).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmms_eval.api.task import ConfigurableTask

from mmlm.errors import UserError
from mmlm.eval import metrics
from mmlm.eval.evaluate import question_prompt_text, read_jsonl
from mmlm.infer.loading import check_file

QUESTIONS_ENV = "MMLM_QUESTIONS"
IMAGES_ENV = "MMLM_IMAGES"
VIDEOS_ENV = "MMLM_VIDEOS"


def load_documents() -> list[dict[str, str]]:
    """The task's documents from `$MMLM_QUESTIONS`, every media file checked before anything runs.

    Each document holds strings only (one Arrow schema whatever the file's
    fields): `question_id`, `kind` ("image", "video" or ""), `media` (the
    file's path or ""), `prompt` (the text asked) and `record` (the
    question's JSON line, which `process_results` scores against).
    """
    path = os.environ.get(QUESTIONS_ENV)
    if not path:
        raise UserError(f"mmlm_questions: set {QUESTIONS_ENV} to a question JSONL (and {IMAGES_ENV} to the "
                        "root of its image paths)")
    rows = read_jsonl(path)
    media_root = Path(os.environ.get(IMAGES_ENV) or os.path.dirname(os.path.abspath(path)))
    if not media_root.is_dir():
        raise UserError(f"mmlm_questions: {IMAGES_ENV}={str(media_root)!r} is not a directory")
    video_root = Path(os.environ.get(VIDEOS_ENV) or media_root)
    docs = []
    for row in rows:
        qid = row["question_id"]
        if not row.get("options") and metrics.reference_answer(row) is None:
            raise UserError(f"mmlm_questions: question {qid!r} in {path} has no 'answer' or 'answers' to score "
                            "exact_match against")
        kind = "image" if "image" in row else "video" if "video" in row else ""
        media = ""
        if kind:
            media_path = (video_root if kind == "video" else media_root) / str(row[kind])
            try:
                check_file(media_path, kind)
            except UserError as e:
                raise UserError(f"mmlm_questions: question {qid!r}: {e} (media paths are relative to "
                                f"{IMAGES_ENV}={str(media_root)!r})") from None
            media = str(media_path)
        docs.append({"question_id": str(qid), "kind": kind, "media": media,
                     "prompt": question_prompt_text(row, append_options=True), "record": json.dumps(row)})
    return docs


class MMLMQuestionsTask(ConfigurableTask):
    """A `ConfigurableTask` whose test split is `load_documents()` instead of a Hugging Face dataset."""

    def __init__(self, *args: Any, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if config is not None:
            config = {k: v for k, v in config.items() if k != "class"}  # the YAML key that named this class
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        from datasets import Dataset, DatasetDict

        self.dataset = DatasetDict({self.config.test_split: Dataset.from_list(load_documents())})
        self.dataset_no_image = self.dataset  # documents hold paths, never decoded media


def doc_to_visual(doc: dict[str, str]) -> list[Any]:
    """[PIL image] (decoded as `mmlm eval` decodes it), [video path], or [] for a text-only question."""
    if doc["kind"] == "image":
        from mmlm.data import preprocess

        try:
            return [preprocess.load_image(doc["media"])]
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"question {doc['question_id']!r}: cannot read image {doc['media']!r}: {e}") from None
    if doc["kind"] == "video":
        return [doc["media"]]
    return []


def doc_to_text(doc: dict[str, str], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The question as `mmlm eval` asks it; the model adds its conversation template and media placeholder."""
    return doc["prompt"]


def doc_to_target(doc: dict[str, str]) -> str:
    """The reference answer (for logs; scoring reads the whole record)."""
    record = json.loads(doc["record"])
    return str(metrics.reference_answer(record) or record.get("answer", ""))


def process_results(doc: dict[str, str], results: list[str]) -> dict[str, float]:
    """`exact_match`: `mmlm.eval.metrics.score(prediction, question)["accuracy"]`, as `mmlm eval` computes it."""
    return {"exact_match": metrics.score(results[0], json.loads(doc["record"]))["accuracy"]}
