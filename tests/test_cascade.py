"""`num_vision_tokens=auto` (`mmlm.infer.cascade`, `mmlm.eval.auto`) on tiny random models: the cascade's answer
is the fixed-budget answer where it stops, the user's mistakes are clear errors (exit 2), and calibration
questions never overlap the evaluated ones."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from mmlm.checkpoint import save_model
from mmlm.cli import chat
from mmlm.cli import eval as eval_cli
from mmlm.config_utils import load_config
from mmlm.data.synth import synthesize
from mmlm.errors import UserError
from mmlm.eval.auto import cascade_row, score_budgets
from mmlm.eval.evaluate import evaluate, prepare_questions, read_jsonl
from mmlm.infer import cascade
from mmlm.infer.loading import load_inference_model
from mmlm.infer.random_model import random_params
from mmlm.models.config import model_config_from_dict


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random checkpoints, Matryoshka (budgets 1, 4) and fixed (4 tokens); shapes questions (two splits)."""
    root = tmp_path_factory.mktemp("cascade")
    config = load_config("configs/tiny.py")
    save_model(str(root / "mat"), random_params(model_config_from_dict(config.model), seed=3), config)
    fixed = load_config("configs/tiny.py")
    fixed.model.compressor.budgets = ()
    save_model(str(root / "fixed"), random_params(model_config_from_dict(fixed.model), seed=3), fixed)
    synthesize("shapes", root / "data", 4, seed=5, split="train", progress=False)
    synthesize("shapes", root / "data", 4, seed=5, split="val", progress=False)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "img.png")
    return root


@pytest.fixture(scope="module")
def decisive(tmp_path_factory):
    """A tiny random Matryoshka model (budgets 1, 4) with weights large enough that the budget changes its
    answers, loaded for inference."""
    root = tmp_path_factory.mktemp("decisive")
    config = load_config("configs/tiny.py")
    save_model(str(root / "mat"), random_params(model_config_from_dict(config.model), seed=3, std=0.3), config)
    return load_inference_model(checkpoint=str(root / "mat"))


def test_the_cascade_answers_as_the_fixed_budget_it_stops_at(models):
    im = load_inference_model(checkpoint=str(models / "mat"))
    rows = read_jsonl(models / "data" / "val_questions.jsonl")
    questions = prepare_questions(im, rows, models / "data")
    kw = dict(batch_size=8, max_new_tokens=3)
    scored = score_budgets(im, questions, (1, 4), **kw)
    assert scored.conf.shape == (len(rows), 2) and np.all((scored.conf > 0) & (scored.conf <= 1))
    threshold = float(np.median(scored.conf[:, 0]))  # some questions stop at 1 token, the others go on to 4
    row, lines = cascade_row(scored, threshold)
    chosen = [line["num_vision_tokens"] for line in lines]
    assert set(chosen) == {1, 4}
    # Each fixed budget alone, through the evaluator's own path (the vision tower inside generation).
    fixed = {m: evaluate(im, questions, [m], progress=False, **kw).answers[m] for m in (1, 4)}
    for i, (line, m) in enumerate(zip(lines, chosen)):
        assert line["text"] == fixed[m][i]["text"] and line["question_id"] == rows[i]["question_id"]
        conf = scored.conf[i]
        assert (conf[0] >= threshold) == (m == 1)  # escalated exactly when 1 token was not confident enough
    assert row["mean_vision_tokens"] == pytest.approx(np.mean(chosen))
    assert row["budget_histogram"] == {"1": chosen.count(1), "4": chosen.count(4)}
    assert row["accuracy"] == pytest.approx(np.mean([fixed[m][i]["accuracy"] for i, m in enumerate(chosen)]))
    # FLOPs: the vision tower once, a prefill per budget tried (an escalation costs the 1-token prefill too).
    t = len(questions[0].prompt) - 1
    one, both = (cascade.prefill_flops(im.cfg, t, (1, 4), k) for k in (0, 1))
    from mmlm.models.flops import analytic_flops, make_workload
    f1, f4 = (analytic_flops(im.cfg, make_workload(im.cfg, t, m)) for m in (1, 4))
    assert one == f1["total"] and both == pytest.approx(f1["total"] + f4["total"] - f4["vision"])
    assert cascade.stop_index(np.array([[0.2, 0.1], [0.9, 0.1]]), 0.5).tolist() == [1, 0]


def test_the_cascade_scores_a_video_file(models):
    """Video files: `evaluate` answers them by chunked encoding, the confidences take the whole video."""
    synthesize("moving_shapes", models / "vdata", 1, seed=5, split="val", progress=False)
    im = load_inference_model(checkpoint=str(models / "mat"))
    questions = prepare_questions(im, read_jsonl(models / "vdata" / "val_questions.jsonl"), models / "vdata")
    assert [q.kind for q in questions] == ["video"]
    kw = dict(batch_size=1, max_new_tokens=3, max_frames=2)
    scored = score_budgets(im, questions, (1, 4), **kw)
    assert scored.conf.shape == (1, 2) and np.all((scored.conf > 0) & (scored.conf <= 1))
    for threshold, m in ((float(scored.conf[0, 0]), 1), (float(np.nextafter(scored.conf[0, 0], 1)), 4)):
        _, lines = cascade_row(scored, threshold)
        assert lines[0]["num_vision_tokens"] == m
        assert lines[0]["text"] == evaluate(im, questions, [m], progress=False, **kw).answers[m][0]["text"]


def test_eval_auto_row_and_chat_says_which_budget(models, capsys):
    out = models / "out"
    rc = eval_cli.main(["--checkpoint", str(models / "mat"), "--data", str(models / "data" / "val_questions.jsonl"),
                        "--num_vision_tokens", "4,auto", "--calibration_data",
                        str(models / "data" / "train_questions.jsonl"), "--out", str(out), "--batch_size", "8",
                        "--max_new_tokens", "3", "--no_progress"])
    assert rc == 0
    printed = capsys.readouterr()
    assert "mean vision tokens" in printed.out and "calibrated on" in printed.err
    summary = json.loads((out / "metrics.json").read_text())
    auto = summary["rows"][1]
    assert auto["num_vision_tokens"] == "auto" and auto["cascade_budgets"] == [1, 4]
    assert 0 < auto["calibration"]["threshold"] < 1 and 1 <= auto["mean_vision_tokens"] <= 4
    assert sum(auto["budget_histogram"].values()) == auto["count"] and auto["flops_per_question"] > 0
    assert len((out / "answers_mauto.jsonl").read_text().splitlines()) == auto["count"]
    err = io.StringIO()
    args = chat.build_parser().parse_args(["--checkpoint", str(models / "mat"), "--image", str(models / "img.png"),
                                      "--prompt", "What color is it?", "--max_new_tokens", "3",
                                      "--num_vision_tokens", "auto", "--auto_threshold", "0.5"])
    assert chat.run(args, stdin=io.StringIO(), out=io.StringIO(), err=err) == 0
    assert "auto: answered with 4 vision token(s)" in err.getvalue()  # a random model is never 50% sure


def test_a_chat_turn_continues_from_the_cascades_prefill_and_reuses_the_image_features(models, decisive, monkeypatch):
    """`mmlm chat`'s auto turn: the answer is the fixed-budget answer where the cascade stops (greedy and
    sampled, same key), decoded from the cascade's own prefill (generation's `stream` never runs), with the
    confidences `mmlm eval` scores on; the image's features, computed once, stand in for the vision tower
    (any pixels give the same answer with them)."""
    import jax

    from mmlm.infer import generate
    from mmlm.infer.batching import PROMPT_BUCKET, make_batch
    from mmlm.infer.chat import answer, image_features
    from mmlm.infer.loading import encode_question, load_image_pixels

    im = decisive
    pixels = load_image_pixels(im, models / "img.png")
    features = image_features(im, pixels)
    question = "What color is the shape?"
    prompt, fuse = encode_question(im, question, True, [], return_fuse_mask=True)
    batch = generate.with_vision_features(im.cfg, im.params, make_batch(
        im.cfg, [prompt], [pixels], pad_id=im.tokenizer.pad_id, pad_len_to=PROMPT_BUCKET, fuse_masks=[fuse]))
    conf = cascade.confidences(im.cfg, im.params, batch, (1, 4))[0]

    def ask(budget, temperature, threshold=None, feats=None, shown=pixels) -> tuple[str, list]:
        seen = []
        text = answer(im, shown, question, [], num_vision_tokens=budget, max_new_tokens=5, temperature=temperature,
                      top_p=0.9, rng=jax.random.PRNGKey(7), out=io.StringIO(), auto_threshold=threshold,
                      vision_features=feats, on_budget=lambda m, probs: seen.append((m, probs)))
        return text, seen

    fixed = {(m, t): ask(m, t)[0] for m in (1, 4) for t in (0.0, 2.0)}
    assert fixed[(1, 2.0)] != fixed[(4, 2.0)] and fixed[(1, 0.0)] != fixed[(4, 0.0)]  # the budget matters here

    def no_second_prefill(*args, **kwargs):
        raise AssertionError("the auto turn ran generation's prefill again")

    monkeypatch.setattr(generate, "stream", no_second_prefill)
    for threshold, m in ((float(conf[0]), 1), (float(np.nextafter(conf[0], 1.0)), 4)):  # stop at 1, escalate
        for t in (0.0, 2.0):
            text, seen = ask(cascade.AUTO, t, threshold)
            assert text == fixed[(m, t)] and seen[0][0] == m
            assert seen[0][1] == pytest.approx(conf[: len(seen[0][1])], rel=0, abs=0)  # `mmlm eval`'s numbers
    monkeypatch.undo()
    noise = np.random.default_rng(1).random(pixels.shape).astype(pixels.dtype)
    for budget in (1, 4):
        assert ask(budget, 0.0, feats=features, shown=noise)[0] == fixed[(budget, 0.0)]


def test_a_batch_decodes_from_the_cascades_prefills_as_each_rows_fixed_budget(decisive):
    """`generate_cascade` (lmms-eval's auto): rows stop at different budgets, and each row's answer, greedy or
    sampled with one key, is `generate`'s at its budget."""
    from mmlm.infer.batching import make_batch
    from mmlm.infer.generate import generate, with_vision_features
    from mmlm.infer.loading import encode_question

    im = decisive
    rng = np.random.default_rng(2)
    prompts = [encode_question(im, q, True, []) for q in ("What color?", "How many shapes are there?", "Is it red?",
                                                          "What shape is the object?")]
    pixels = [rng.random((1, 1, im.image_size, im.image_size, 3), np.float32) for _ in prompts]
    batch = make_batch(im.cfg, prompts, pixels, pad_id=im.tokenizer.pad_id, batch_size=5)  # one padding row
    conf = cascade.confidences(im.cfg, im.params, with_vision_features(im.cfg, im.params, batch), (1, 4))
    threshold = float(np.median(conf[:4, 0]))
    for temperature in (0.0, 2.0):
        kw = dict(max_new_tokens=4, eos_id=im.stop_ids, temperature=temperature, top_p=0.9,
                  rng=__import__("jax").random.PRNGKey(4))
        tokens, lengths, used, seen = cascade.generate_cascade(im.cfg, im.params, batch, threshold, rows=4, **kw)
        assert sorted(set(used[:4].tolist())) == [1, 4]
        assert np.array_equal(seen[:4, 0], conf[:4, 0])
        fixed = {m: generate(im.cfg, im.params, batch, num_vision_tokens=m, **kw) for m in (1, 4)}
        for j in range(4):
            t, n = fixed[int(used[j])]
            assert tokens[j].tolist() == t[j].tolist() and lengths[j] == n[j]


@pytest.mark.parametrize("which, extra, message", [
    ("fixed", [], "needs a Matryoshka model"),
    ("mat", ["--auto_threshold", "1.5"], "strictly between 0 and 1"),
    ("mat", ["--auto_threshold", "0"], "strictly between 0 and 1"),
])
def test_auto_mistakes_exit_2(models, capsys, which, extra, message):
    rc = eval_cli.main(["--checkpoint", str(models / which), "--data", str(models / "data" / "val_questions.jsonl"),
                        "--num_vision_tokens", "auto", "--out", str(models / "bad"), *extra])
    assert rc == 2 and message in capsys.readouterr().err
    rc = chat.main(["--checkpoint", str(models / which), "--image", str(models / "img.png"), "--prompt", "q",
                    "--num_vision_tokens", "auto", *extra])
    assert rc == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        chat.build_parser().parse_args(["--checkpoint", "x", "--image", "y", "--num_vision_tokens", "most"])


def test_calibration_questions_are_disjoint_from_the_evaluated_ones(models, capsys):
    train = read_jsonl(models / "data" / "train_questions.jsonl")
    val = read_jsonl(models / "data" / "val_questions.jsonl")
    cascade.check_disjoint(train, val)  # the training split's questions: different images and ids
    assert not {q["image"] for q in train} & {q["image"] for q in val}
    with pytest.raises(UserError, match="overlap"):
        cascade.check_disjoint(train + val[:1], val)
    renamed = [{**q, "question_id": f"x-{q['question_id']}"} for q in val[:1]]  # same image and text
    with pytest.raises(UserError, match="overlap"):
        cascade.check_disjoint(renamed, val)
    rc = eval_cli.main(["--checkpoint", str(models / "mat"), "--data", str(models / "data" / "val_questions.jsonl"),
                        "--num_vision_tokens", "auto", "--calibration_data",
                        str(models / "data" / "val_questions.jsonl"), "--out", str(models / "bad")])
    assert rc == 2 and "overlap the evaluation questions" in capsys.readouterr().err
    conf = np.array([[0.9, 0.9], [0.2, 0.8], [0.3, 0.9]])
    correct = np.array([[True, True], [False, True], [False, True]])
    assert cascade.calibrate_threshold(conf, correct, (1, 4)) > 0.3  # escalates the two unsure wrong answers
