"""Answer normalisation and scoring (VQA-style exact match, VQA soft accuracy, multiple choice).

Normalisation follows the VQA evaluation script's spirit: lower case;
periods dropped unless they are decimal points, commas dropped inside
numbers, apostrophes dropped ("don't" -> "dont"), other punctuation turned
into spaces; number words up to twenty become digits; articles (a, an, the)
removed; whitespace collapsed. "The Circle." and "circle" are then equal,
as are "two" and "2".

Per question (fields of the LLaVA-style question JSONL):
* `answer`: exact match after normalisation -> `accuracy`;
* `answers` (a list, e.g. VQAv2's 10 annotator answers): soft accuracy
  min(#annotators who gave the predicted answer / 3, 1) -> `vqa_accuracy`;
* `options` (a list of choice texts): the prediction is mapped to an option
  (a letter "B", "(B)", "B." / "B) ..." or the option's text) and compared with
  the gold option (`answer` as a letter or as the option text) -> `mc_accuracy`.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Mapping, Sequence

NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13",
    "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18",
    "nineteen": "19", "twenty": "20",
}
ARTICLES = frozenset({"a", "an", "the"})
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PUNCT = re.compile("[" + re.escape(string.punctuation.replace("'", "")) + "]")
LETTERS = string.ascii_uppercase


def normalize_answer(text: str) -> str:
    """VQA-style normalised answer (see the module docstring)."""
    t = str(text).lower().replace("\n", " ").replace("\t", " ").strip()
    t = _THOUSANDS_COMMA.sub("", t)
    t = _DECIMAL_POINT.sub("\0", t)  # protect decimal points from the punctuation pass
    t = t.replace("'", "").replace("\u2019", "")
    t = _PUNCT.sub(" ", t).replace("\0", ".")
    words = [NUMBER_WORDS.get(w, w) for w in t.split()]
    return " ".join(w for w in words if w not in ARTICLES)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(#answers equal to the prediction / 3, 1), after normalisation."""
    pred = normalize_answer(prediction)
    matches = sum(1 for a in answers if normalize_answer(a) == pred)
    return min(matches / 3.0, 1.0)


_LETTER_ONLY = re.compile(r"^\(?([A-Za-z])\)?[.):]?$")
_LETTER_PREFIX = re.compile(r"^\(?([A-Z])[.):]\s")
_OPTION_PREFIX = re.compile(r"^\(?[A-Z][.):]\s*")


def option_text(option: str) -> str:
    """An option without a leading letter label ("B. red" -> "red")."""
    return _OPTION_PREFIX.sub("", str(option).strip())


def parse_choice(prediction: str, options: Sequence[str]) -> int | None:
    """Index of the option a prediction names, or None.

    Accepts a bare letter ("B", "(b)", "B."), a letter label followed by text
    ("B. red", "(B) red"), the option's text, or a sentence containing exactly
    one option's text as a whole word sequence.
    """
    pred = str(prediction).strip()
    n = len(options)
    m = _LETTER_ONLY.match(pred) or _LETTER_PREFIX.match(pred)
    if m:
        i = LETTERS.index(m.group(1).upper())
        return i if i < n else None
    norm = normalize_answer(pred)
    texts = [normalize_answer(option_text(o)) for o in options]
    if norm in texts:
        return texts.index(norm)
    padded = f" {norm} "
    hits = [i for i, t in enumerate(texts) if t and f" {t} " in padded]
    return hits[0] if len(hits) == 1 else None


def gold_choice(answer: str, options: Sequence[str]) -> int:
    """Index of the correct option: `answer` is its letter or its text."""
    a = str(answer).strip()
    m = _LETTER_ONLY.match(a)
    if m and LETTERS.index(m.group(1).upper()) < len(options):
        return LETTERS.index(m.group(1).upper())
    texts = [normalize_answer(option_text(o)) for o in options]
    norm = normalize_answer(a)
    if norm in texts:
        return texts.index(norm)
    raise ValueError(f"answer {answer!r} is neither an option letter nor one of the options {list(options)}")


def reference_answer(question: Mapping[str, Any]) -> str | None:
    """The exact-match reference: `answer`, else the most common of `answers`."""
    if question.get("answer") is not None:
        return str(question["answer"])
    answers = question.get("answers")
    if answers:
        return collections.Counter(normalize_answer(a) for a in answers).most_common(1)[0][0]
    return None


def score(prediction: str, question: Mapping[str, Any]) -> dict[str, float]:
    """Per-question scores: any of `accuracy`, `vqa_accuracy`, `mc_accuracy` the question supports."""
    out: dict[str, float] = {}
    options = question.get("options")
    if options:
        correct = float(parse_choice(prediction, options) == gold_choice(question["answer"], options))
        # With options, "exact match" means naming the right option (by letter or by text).
        out["mc_accuracy"] = out["accuracy"] = correct
    else:
        ref = reference_answer(question)
        if ref is not None:
            out["accuracy"] = float(exact_match(prediction, ref))
    answers = question.get("answers")
    if answers:
        out["vqa_accuracy"] = vqa_soft_accuracy(prediction, answers)
    return out


METRICS = ("accuracy", "vqa_accuracy", "mc_accuracy")


def aggregate(scores: Sequence[Mapping[str, float]], categories: Sequence[str | None] | None = None
              ) -> dict[str, Any]:
    """Means of each metric over the questions that have it (None when none do), counts, per-category accuracy."""
    row: dict[str, Any] = {"count": len(scores)}
    for name in METRICS:
        values = [s[name] for s in scores if name in s]
        row[name] = float(sum(values) / len(values)) if values else None
        if name != "accuracy":
            row[f"{name.split('_')[0]}_count"] = len(values)
    if categories is not None and any(c is not None for c in categories):
        by: dict[str, list[float]] = collections.defaultdict(list)
        for s, c in zip(scores, categories):
            if c is not None and "accuracy" in s:
                by[str(c)].append(s["accuracy"])
        row["by_category"] = {c: float(sum(v) / len(v)) for c, v in sorted(by.items())}
    return row


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table: one row per token budget."""
    cols = ("num_vision_tokens", "count") + METRICS

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" if isinstance(v, float) else str(v)

    table = [list(cols)] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table)
