"""`mmlm eval` end to end on a tiny random checkpoint: files, rows per budget, consistent metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmlm.checkpoint import save_model
from mmlm.config_utils import load_config
from mmlm.data.synth import synthesize
from mmlm.eval import cli, metrics
from mmlm.infer.random_model import random_params
from mmlm.models.config import model_config_from_dict


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    config = load_config("configs/tiny.py")
    save_model(str(root / "ckpt"), random_params(model_config_from_dict(config.model), seed=2), config)
    data = root / "data"
    synthesize("shapes", data, 3, seed=11, split="test", progress=False)
    synthesize("moving_shapes", data, 1, seed=11, split="vtest", progress=False)
    lines = [json.loads(x) for x in (data / "test_questions.jsonl").read_text().splitlines()]
    lines += [json.loads(x) for x in (data / "vtest_questions.jsonl").read_text().splitlines()]
    image = lines[0]["image"]
    lines.append({"question_id": "mc-1", "image": image, "text": "Which color?", "options": ["red", "blue"],
                  "answer": "A"})
    lines.append({"question_id": "vqa-1", "image": image, "text": "What is it?",
                  "answers": ["circle", "circle", "square"]})
    lines.append({"question_id": "text-1", "text": "Say yes.", "answer": "yes"})
    (data / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root, lines


def test_eval_rows_per_budget_and_consistent_files(setup, capsys):
    root, lines = setup
    out = root / "out"
    rc = cli.main(["--checkpoint", str(root / "ckpt"), "--data", str(root / "data" / "q.jsonl"),
                   "--images", str(root / "data"), "--num_vision_tokens", "1,4", "--out", str(out),
                   "--batch_size", "4", "--max_new_tokens", "4", "--max_frames", "2", "--no_progress"])
    assert rc == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert [row.split()[0] for row in table] == ["num_vision_tokens", "1", "4"]
    summary = json.loads((out / "metrics.json").read_text())
    assert [r["num_vision_tokens"] for r in summary["rows"]] == [1, 4]
    assert summary["accuracy"] == summary["rows"][0]["accuracy"]
    assert summary["num_vision_tokens"] == 1
    n = len(lines)
    for row in summary["rows"]:
        m = row["num_vision_tokens"]
        answers = [json.loads(x) for x in (out / f"answers_m{m}.jsonl").read_text().splitlines()]
        assert [a["question_id"] for a in answers] == [q["question_id"] for q in lines]
        assert row["count"] == n
        rescored = [metrics.score(a["text"], q) for a, q in zip(answers, lines)]
        assert row["accuracy"] == pytest.approx(np.mean([s["accuracy"] for s in rescored]))
        assert row["mc_count"] == 1 and row["vqa_count"] == 1
        assert row["mc_accuracy"] == rescored[-3]["mc_accuracy"]
        assert row["vqa_accuracy"] == rescored[-2]["vqa_accuracy"]
        assert all(a["num_vision_tokens"] == m for a in answers)
        assert answers[-3]["prompt"].splitlines()[1:3] == ["A. red", "B. blue"]
    assert (out / "answers.jsonl").read_text() == (out / "answers_m1.jsonl").read_text()
    # The text-only question does not depend on the budget; with greedy decoding its answer is identical.
    a1 = json.loads((out / "answers_m1.jsonl").read_text().splitlines()[-1])
    a4 = json.loads((out / "answers_m4.jsonl").read_text().splitlines()[-1])
    assert a1["text"] == a4["text"]


def test_eval_rejects_unsupported_budget_before_compute(setup, capsys):
    root, _ = setup
    rc = cli.main(["--checkpoint", str(root / "ckpt"), "--data", str(root / "data" / "q.jsonl"),
                   "--num_vision_tokens", "1,16", "--out", str(root / "bad")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "num_vision_tokens=16 is not supported" in err and "Supported budgets: [1, 4]" in err
    assert not (root / "bad").exists()


def test_eval_missing_media_names_the_question(setup, capsys):
    root, _ = setup
    q = root / "missing.jsonl"
    q.write_text(json.dumps({"question_id": "gone-7", "image": "nope.png", "text": "q", "answer": "a"}) + "\n")
    rc = cli.main(["--checkpoint", str(root / "ckpt"), "--data", str(q), "--out", str(root / "bad2")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "question 'gone-7'" in err and "nope.png" in err and "does not exist" in err


def test_eval_bad_budget_syntax():
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["--checkpoint", "x", "--data", "y", "--out", "z", "--num_vision_tokens", "1,a"])
