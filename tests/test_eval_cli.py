"""`mmlm eval` end to end on a tiny random checkpoint: files, rows per budget, consistent metrics."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mmlm.checkpoint import save_model
from mmlm.cli import eval as cli
from mmlm.config_utils import load_config
from mmlm.data.synth import synthesize
from mmlm.eval import metrics
from mmlm.infer.random_model import random_params
from mmlm.models.config import model_config_from_dict


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    config = load_config("configs/tiny.py")
    config.data.max_text_len = 128  # tiny trains on 32-token texts; these questions (options appended) are longer
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
        cli.build_parser().parse_args(["--checkpoint", "x", "--data", "y", "--out", "z", "--num_vision_tokens", "1,a"])


@pytest.mark.parametrize("kind", ["file", "readonly"])
def test_eval_checks_out_before_loading_anything(setup, capsys, kind, tmp_path):
    root, _ = setup
    if kind == "file":
        out = tmp_path / "results"
        out.write_text("not a directory")
    else:  # /proc refuses new files even to root
        if not os.path.isdir("/proc/self"):
            pytest.skip("needs Linux /proc")
        out = "/proc/mmlm-results/run1"
    rc = cli.main(["--checkpoint", str(root / "nonexistent-ckpt"), "--data", str(root / "data" / "q.jsonl"),
                   "--images", str(root / "data"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "--out" in err and str(out) in err
    assert "nonexistent-ckpt" not in err  # failed on --out, before the model


def test_eval_skips_undecodable_media_and_keeps_the_rest(setup, capsys, tmp_path):
    root, lines = setup
    (root / "data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = [lines[0], {"question_id": "broken-1", "image": "broken.png", "text": "q", "answer": "a"}, lines[1]]
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in rows))
    out = tmp_path / "out"
    rc = cli.main(["--checkpoint", str(root / "ckpt"), "--data", str(q), "--images", str(root / "data"),
                   "--out", str(out), "--max_new_tokens", "2", "--no_progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "broken-1" in err and "broken.png" in err and "skipped" in err
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["count"] == 2 and [s["question_id"] for s in summary["skipped"]] == ["broken-1"]
    answers = [json.loads(x)["question_id"] for x in (out / "answers.jsonl").read_text().splitlines()]
    assert answers == [lines[0]["question_id"], lines[1]["question_id"]]


def test_eval_interrupted_keeps_answers_already_computed(setup, monkeypatch, tmp_path):
    """An interruption after the first batch leaves that batch's answers on disk."""
    from mmlm.infer import generate as gen

    root, lines = setup
    image_lines = [x for x in lines if "image" in x][:4]
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in image_lines))
    real, calls = gen.generate, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate", flaky)
    out = tmp_path / "out"
    rc = cli.main(["--checkpoint", str(root / "ckpt"), "--data", str(q), "--images", str(root / "data"),
                   "--out", str(out), "--batch_size", "2", "--max_new_tokens", "2", "--no_progress"])
    assert rc == 130  # Ctrl-C: one line and exit status 130, no traceback
    (path,) = out.glob("answers_m*.jsonl")
    kept = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(kept) == 2 and all("text" in a and "accuracy" in a for a in kept)


def test_eval_reads_a_latin1_question_file(setup, capsys, tmp_path):
    root, _ = setup
    q = tmp_path / "latin1.jsonl"
    q.write_bytes((json.dumps({"question_id": "l1", "text": "Caf\u00e9?", "answer": "oui"}, ensure_ascii=False)
                   + "\n").encode("latin-1"))
    with pytest.warns(UserWarning, match="Latin-1"):
        rc = cli.main(["--checkpoint", str(root / "ckpt"), "--data", str(q), "--out", str(tmp_path / "o"),
                       "--max_new_tokens", "2", "--no_progress"])
    assert rc == 0
    (line,) = [json.loads(x) for x in (tmp_path / "o" / "answers.jsonl").read_text().splitlines()]
    assert line["prompt"] == "Caf\u00e9?"


def test_eval_refuses_a_question_longer_than_the_model_text_length(setup, capsys, tmp_path):
    root, _ = setup
    q = tmp_path / "long.jsonl"
    q.write_text(json.dumps({"question_id": "long-1", "text": "red " * 20000, "answer": "a"}) + "\n")
    rc = cli.main(["--checkpoint", str(root / "ckpt"), "--data", str(q), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "long-1" in err and "max_text_len" in err
