"""Periodic evaluation on the eval split: teacher-forced loss and exact-match accuracy.

* `eval/loss`, `eval/token_accuracy`: next-token loss on the answer tokens
  of the first `eval.loss_batches` eval batches (each process reads its shard;
  padding examples carry no labels), at the model's default budget.
* `eval/accuracy`: the first `eval.num_questions` held-out conversations are
  cut at their first answer; the prompt (everything before it, image
  included) is answered and scored by the project's one evaluator,
  `mmlm.eval.evaluate.evaluate` (greedy KV-cache generation; exact match
  after `mmlm.eval.metrics.normalize_answer`, the same as `mmlm eval`). With
  `eval.budgets`, also `eval/accuracy@m` per Matryoshka budget m, answered in
  the same pass over the questions.

Generation runs the same prompts on every process (each reads the whole
question set), because the prompt batches are host numpy arrays that jit
treats as replicated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmlm import IGNORE_INDEX, IMAGE_TOKEN_ID
from mmlm.eval.evaluate import EvalQuestion, evaluate
from mmlm.infer.loading import inference_model
from mmlm.models.config import ModelConfig
from mmlm.models.llava_mini import LlavaMini
from mmlm.train.data import global_batch, make_pipeline, take
from mmlm.sharding import BATCH_AXES
from mmlm.train.step import make_eval_step, model_inputs

_ROLE_SUFFIX = re.compile(r"\s*(ASSISTANT:|assistant)\s*$")


@dataclasses.dataclass
class Question:
    """The first question of one eval conversation."""

    example_id: int
    prompt: list[int]       # ids up to where the first answer starts (one IMAGE_TOKEN_ID if media)
    answer: list[int]       # reference answer ids (without the end-of-turn token)
    media: np.ndarray | None  # (F, K, H, W, 3) pixels, real frames only


def first_questions(batch: dict[str, np.ndarray], stop_ids: Sequence[int]) -> list[Question]:
    """Splits each real row of an eval batch at its first supervised token."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        if int(batch["example_id"][i]) < 0:
            continue  # padding
        labels = batch["labels"][i]
        supervised = np.nonzero(labels != IGNORE_INDEX)[0]
        if not len(supervised):
            continue
        start = int(supervised[0])
        end = start
        while end < len(labels) and labels[end] != IGNORE_INDEX:
            end += 1
        answer = [int(t) for t in labels[start:end] if int(t) not in stop_ids]
        prompt = [int(t) for t in batch["input_ids"][i, :start]]
        media = None
        if IMAGE_TOKEN_ID in prompt:
            frames = batch["frame_mask"][i]
            media = batch["images"][i][: max(int(frames.sum()), 1)]
        out.append(Question(int(batch["example_id"][i]), prompt, answer, media))
    return out


def question_text(tokenizer: Any, prompt: Sequence[int]) -> str:
    """The user's question for display: prompt text after the image placeholder, minus the role header."""
    ids = list(prompt)
    if IMAGE_TOKEN_ID in ids:
        ids = ids[ids.index(IMAGE_TOKEN_ID) + 1:]
    return _ROLE_SUFFIX.sub("", tokenizer.decode(ids)).strip()


class Evaluator:
    """Evaluates params on the eval split (reuses compiled programs across calls)."""

    def __init__(self, config: ml_collections.ConfigDict, cfg: ModelConfig, mesh: Mesh):
        from mmlm.data import templates
        from mmlm.data.tokenizer import load_tokenizer

        self.config = config
        self.cfg = cfg
        self.mesh = mesh
        self.ev = config.eval
        self.split = config.data.eval_split
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        self.stop_ids = templates.stop_token_ids(self.tokenizer, config.data.template)
        self.model = LlavaMini(cfg)
        self._eval_step = jax.jit(make_eval_step(self.model), static_argnums=2)
        self._loss_pipe = make_pipeline(config, self.split, train=False)
        self.categories: dict[int, str] = {}
        path = self.ev.get("categories_file", "")
        if path and os.path.isfile(path):
            with open(path) as f:
                self.categories = {int(k): v for k, v in json.load(f).items()}
        self._gen_pipe = make_pipeline(config, self.split, train=False, local_only=True)
        self._questions: list[EvalQuestion] | None = None

    # --------------------------------------------------------------------- loss
    def loss(self, params: Any, budget: int | None = None) -> dict[str, float]:
        budget = self.cfg.check_budget(budget)
        sums = np.zeros(3)
        n = int(self.ev.loss_batches) or None
        for local in take(iter(self._loss_pipe), n):
            local = pad_rows(model_inputs(local), self._local_row_multiple())
            out = self._eval_step(params, global_batch(local, self.mesh), budget)
            sums += [float(out["loss_sum"]), float(out["num_tokens"]), float(out["num_correct"])]
        tokens = max(sums[1], 1.0)
        return {"eval/loss": sums[0] / tokens, "eval/token_accuracy": sums[2] / tokens}

    def _local_row_multiple(self) -> int:
        """Rows each process must hold so that the batch axes (data x fsdp) divide the global batch."""
        shards = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
        return max(1, shards // jax.process_count())

    # ----------------------------------------------------------------- accuracy
    def questions(self, limit: int) -> list[Question]:
        out: list[Question] = []
        for batch in iter(self._gen_pipe):
            out += first_questions(batch, self.stop_ids)
            if len(out) >= limit:
                break
        return out[:limit]

    def eval_questions(self) -> list[EvalQuestion]:
        """The first `eval.num_questions` held-out questions as the evaluator's input (built once)."""
        if self._questions is None:
            self._questions = [
                EvalQuestion(index=i, record=self._record(q), kind=_media_kind(q.media), media=None,
                             prompt=q.prompt, prompt_text=question_text(self.tokenizer, q.prompt), pixels=q.media)
                for i, q in enumerate(self.questions(int(self.ev.num_questions)))]
        return self._questions

    def _record(self, q: Question) -> dict[str, Any]:
        record: dict[str, Any] = {"question_id": q.example_id, "answer": self.tokenizer.decode(q.answer).strip()}
        if self.categories:
            record["category"] = self.categories.get(q.example_id, "other")
        return record

    def accuracy(self, params: Any, budgets: Sequence[int | None] = (None,), samples: int = 0
                 ) -> tuple[dict[str, float], list[dict[str, str]]]:
        """{"eval/accuracy": ..., "eval/accuracy@m": ...} and up to `samples` example answers.

        All budgets are answered in one pass over the questions (each batch's
        prompts are built once and generated at every budget).
        """
        if int(self.ev.num_questions) <= 0:
            return {}, []
        questions = self.eval_questions()
        if not questions:
            return {}, []
        im = inference_model(self.config, params, "training run", allow_plain=True)
        bs = int(self.config.data.eval_batch_size or self.config.data.batch_size)
        result = evaluate(im, questions, budgets, batch_size=bs, max_new_tokens=int(self.ev.max_new_tokens),
                          progress=False)
        by_budget = {row["num_vision_tokens"]: row for row in result.rows}
        default = self.cfg.check_budget(None)
        metrics: dict[str, float] = {}
        for budget in budgets:
            m = self.cfg.check_budget(budget)
            row = by_budget[m]
            name = "eval/accuracy" if budget is None else f"eval/accuracy@{m}"
            metrics[name] = float(row["accuracy"])
            if budget is None:
                for cat, acc in row.get("by_category", {}).items():
                    metrics[f"{name}/{cat}"] = acc
        metrics["eval/num_questions"] = len(questions)
        shown = [{"question": line["prompt"], "reference": line["answer"], "category": line.get("category", ""),
                  "answer": line["text"], "correct": "yes" if line["accuracy"] else "no"}
                 for line in result.answers[default][:samples]]
        return metrics, shown

    def run(self, params: Any, samples: int = 0) -> tuple[dict[str, float], list[dict[str, str]]]:
        metrics = self.loss(params)
        extra = tuple(int(b) for b in self.ev.budgets)
        acc, shown = self.accuracy(params, (None,) + extra, samples)
        metrics.update(acc)
        return metrics, shown


def pad_rows(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Pads a host batch with masked rows (no attention, no labels, no frames) to a multiple of `multiple`.

    An eval batch size the data-parallel axes do not divide (e.g. 125 rows on
    fsdp=4) would otherwise fail to shard; the padding rows add nothing to the
    loss sums.
    """
    rows = next(iter(batch.values())).shape[0]
    extra = -rows % multiple
    if not extra:
        return batch
    out = {}
    for k, v in batch.items():
        fill = IGNORE_INDEX if k == "labels" else 0
        out[k] = np.concatenate([v, np.full((extra,) + v.shape[1:], fill, v.dtype)])
    return out


def _media_kind(media: np.ndarray | None) -> str | None:
    """Batching group of a held-out question: video batches are padded to the model's frame cap."""
    if media is None:
        return None
    return "video" if media.shape[0] > 1 else "image"
