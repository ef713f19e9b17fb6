"""Periodic evaluation on the eval split: teacher-forced loss and exact-match accuracy.

* `eval/loss`, `eval/token_accuracy`: next-token loss on the answer tokens
  of the first `eval.loss_batches` eval batches (each process reads its shard;
  padding examples carry no labels), at the model's default budget.
* `eval/accuracy`: the first `eval.num_questions` held-out conversations are
  cut at their first answer; the prompt (everything before it, image
  included) is answered greedily with `mmlm.infer.generate` (KV cache, stops
  at the template's end-of-turn token) and the answer counts as correct when
  it equals the reference after `normalize_answer`. With `eval.budgets`,
  also `eval/accuracy@m` per Matryoshka budget m.

Generation runs the same prompts on every process (each reads the whole
question set), because the prompt batches are host numpy arrays that jit
treats as replicated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmlm import IGNORE_INDEX, IMAGE_TOKEN_ID
from mmlm.models.config import ModelConfig
from mmlm.models.llava_mini import LlavaMini
from mmlm.train.data import global_batch, make_pipeline, take
from mmlm.train.step import make_eval_step, model_inputs

_ROLE_SUFFIX = re.compile(r"\s*(ASSISTANT:|assistant)\s*$")


def normalize_answer(text: str) -> str:
    """Lower case, no surrounding punctuation / whitespace, single spaces (VQA-style exact match)."""
    text = text.strip().lower()
    text = text.strip(string.punctuation + string.whitespace)
    return " ".join(text.split())


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

    # --------------------------------------------------------------------- loss
    def loss(self, params: Any, budget: int | None = None) -> dict[str, float]:
        budget = self.cfg.check_budget(budget)
        sums = np.zeros(3)
        n = int(self.ev.loss_batches) or None
        for local in take(iter(self._loss_pipe), n):
            out = self._eval_step(params, global_batch(model_inputs(local), self.mesh), budget)
            sums += [float(out["loss_sum"]), float(out["num_tokens"]), float(out["num_correct"])]
        tokens = max(sums[1], 1.0)
        return {"eval/loss": sums[0] / tokens, "eval/token_accuracy": sums[2] / tokens}

    # ----------------------------------------------------------------- accuracy
    def questions(self, limit: int) -> list[Question]:
        out: list[Question] = []
        for batch in iter(self._gen_pipe):
            out += first_questions(batch, self.stop_ids)
            if len(out) >= limit:
                break
        return out[:limit]

    def answer(self, params: Any, questions: Sequence[Question], budget: int | None) -> list[list[int]]:
        """Greedy answers (token ids) to `questions`, in batches of the eval batch size."""
        from mmlm.infer.batching import make_batch
        from mmlm.infer.generate import generate, trim_answer

        bs = int(self.config.data.eval_batch_size or self.config.data.batch_size)
        frames = max((q.media.shape[0] for q in questions if q.media is not None), default=1)
        answers: list[list[int]] = []
        for i in range(0, len(questions), bs):
            chunk = questions[i: i + bs]
            batch = make_batch(self.cfg, [q.prompt for q in chunk], [q.media for q in chunk],
                               pad_id=self.tokenizer.pad_id, pad_len_to=16, frames=frames, batch_size=bs)
            tokens, lengths = generate(self.cfg, params, batch, max_new_tokens=int(self.ev.max_new_tokens),
                                       eos_id=self.stop_ids, num_vision_tokens=budget,
                                       pad_id=self.tokenizer.pad_id)
            answers += [trim_answer(tokens[j], lengths[j]) for j in range(len(chunk))]
        return answers

    def accuracy(self, params: Any, budgets: Sequence[int | None] = (None,), samples: int = 0
                 ) -> tuple[dict[str, float], list[dict[str, str]]]:
        """{"eval/accuracy": ..., "eval/accuracy@m": ...} and up to `samples` example answers."""
        limit = int(self.ev.num_questions)
        if limit <= 0:
            return {}, []
        questions = self.questions(limit)
        if not questions:
            return {}, []
        metrics: dict[str, float] = {}
        shown: list[dict[str, str]] = []
        for budget in budgets:
            m = self.cfg.check_budget(budget)
            preds = self.answer(params, questions, m)
            correct = []
            for j, (q, p) in enumerate(zip(questions, preds)):
                pred_text, ref_text = self.tokenizer.decode(p), self.tokenizer.decode(q.answer)
                ok = normalize_answer(pred_text) == normalize_answer(ref_text)
                correct.append(ok)
                if budget is None and j < samples:
                    shown.append({"question": question_text(self.tokenizer, q.prompt), "reference": ref_text,
                                  "category": self.categories.get(q.example_id, ""),
                                  "answer": pred_text, "correct": "yes" if ok else "no"})
            acc = float(np.mean(correct))
            name = "eval/accuracy" if budget is None else f"eval/accuracy@{m}"
            metrics[name] = acc
            if budget is None and self.categories:
                by_cat: dict[str, list[bool]] = {}
                for q, ok in zip(questions, correct):
                    by_cat.setdefault(self.categories.get(q.example_id, "other"), []).append(ok)
                for cat, oks in sorted(by_cat.items()):
                    metrics[f"{name}/{cat}"] = float(np.mean(oks))
        metrics["eval/num_questions"] = len(questions)
        return metrics, shown

    def run(self, params: Any, samples: int = 0) -> tuple[dict[str, float], list[dict[str, str]]]:
        metrics = self.loss(params)
        extra = tuple(int(b) for b in self.ev.budgets)
        acc, shown = self.accuracy(params, (None,) + extra, samples)
        metrics.update(acc)
        return metrics, shown
