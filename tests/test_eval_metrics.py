"""Answer normalisation and the eval metrics (no model involved)."""

from __future__ import annotations

import json

import pytest

from mmlm.eval import metrics
from mmlm.eval.evaluate import question_prompt_text, read_jsonl
from mmlm.errors import UserError


@pytest.mark.parametrize("text, expected", [
    ("The Circle.", "circle"),
    ("  RED  ", "red"),
    ("two", "2"),
    ("There are Three.", "there are 3"),
    ("an apple", "apple"),
    ("Don't", "dont"),
    ("3.5", "3.5"),
    ("1,000 people", "1000 people"),
    ("left,right", "left right"),
    ("yes!", "yes"),
    ("a\tb\nc", "b c"),
    ("twenty-one", "20 1"),
])
def test_normalize_answer(text, expected):
    assert metrics.normalize_answer(text) == expected


def test_exact_match_uses_normalisation():
    assert metrics.exact_match("Two.", "2")
    assert metrics.exact_match("the square", "Square")
    assert not metrics.exact_match("squares", "square")


def test_vqa_soft_accuracy():
    answers = ["red"] * 2 + ["dark red"] * 8
    assert metrics.vqa_soft_accuracy("Red", answers) == pytest.approx(2 / 3)
    assert metrics.vqa_soft_accuracy("dark red", answers) == 1.0
    assert metrics.vqa_soft_accuracy("blue", answers) == 0.0
    assert metrics.vqa_soft_accuracy("3", ["three", "3", "three."]) == 1.0


@pytest.mark.parametrize("prediction, choice", [
    ("B", 1), ("(b)", 1), ("B.", 1), ("B. green", 1), ("(C) blue", 2), ("green", 1), ("Green.", 1),
    ("It is green", 1), ("A", 0), ("E", None), ("red or green", None), ("purple", None),
])
def test_parse_choice(prediction, choice):
    assert metrics.parse_choice(prediction, ["red", "green", "blue"]) == choice


def test_gold_choice_letter_or_text_and_labelled_options():
    assert metrics.gold_choice("C", ["red", "green", "blue"]) == 2
    assert metrics.gold_choice("green", ["A. red", "B. green"]) == 1
    assert metrics.parse_choice("green", ["A. red", "B. green"]) == 1
    with pytest.raises(ValueError, match="neither an option letter"):
        metrics.gold_choice("purple", ["red", "green"])


def test_score_and_aggregate():
    q_plain = {"answer": "two", "category": "count"}
    q_vqa = {"answers": ["cat"] * 3 + ["dog"] * 7}
    q_mc = {"answer": "B", "options": ["cat", "dog"], "category": "animal"}
    assert metrics.score("2", q_plain) == {"accuracy": 1.0}
    s = metrics.score("cat", q_vqa)
    assert s == {"accuracy": 0.0, "vqa_accuracy": 1.0}  # the exact-match reference is the majority "dog"
    assert metrics.score("dog", q_mc) == {"accuracy": 1.0, "mc_accuracy": 1.0}
    assert metrics.score("A", q_mc) == {"accuracy": 0.0, "mc_accuracy": 0.0}
    scores = [metrics.score("2", q_plain), metrics.score("cat", q_vqa), metrics.score("A", q_mc)]
    row = metrics.aggregate(scores, ["count", None, "animal"])
    assert row["count"] == 3
    assert row["accuracy"] == pytest.approx(1 / 3)
    assert row["vqa_accuracy"] == 1.0 and row["vqa_count"] == 1
    assert row["mc_accuracy"] == 0.0 and row["mc_count"] == 1
    assert row["by_category"] == {"animal": 0.0, "count": 1.0}
    empty = metrics.aggregate([{"accuracy": 1.0}])
    assert empty["vqa_accuracy"] is None and empty["mc_accuracy"] is None


def test_format_table_one_row_per_budget():
    rows = [{"num_vision_tokens": m, "count": 10, "accuracy": a, "vqa_accuracy": None, "mc_accuracy": None}
            for m, a in ((1, 0.5), (4, 0.75), (16, 0.9))]
    lines = metrics.format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["num_vision_tokens", "count", "accuracy", "vqa_accuracy", "mc_accuracy"]
    assert lines[2].split() == ["4", "10", "75.0%", "-", "-"]


def test_mc_prompt_lists_options():
    text = question_prompt_text({"text": "Which animal?", "options": ["A. cat", "dog"]}, append_options=True)
    assert text.splitlines() == ["Which animal?", "A. cat", "B. dog",
                                 "Answer with the option's letter from the given choices directly."]
    assert question_prompt_text({"text": "Which animal?", "options": ["cat", "dog"]}, False) == "Which animal?"


def test_read_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 1, "image": "a.png", "text": "q", "answer": "x"}) + "\n"
                    + json.dumps({"question_id": 2, "image": "b.png"}) + "\n")
    with pytest.raises(UserError, match=r"q.jsonl:2: missing field 'text'"):
        read_jsonl(path)
    path.write_text("{not json\n")
    with pytest.raises(UserError, match=r"q.jsonl:1: not valid JSON"):
        read_jsonl(path)
    path.write_text(json.dumps({"question_id": 1, "text": "q", "options": ["a", "b"], "answer": "z"}) + "\n")
    with pytest.raises(UserError, match="neither an option letter"):
        read_jsonl(path)
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
