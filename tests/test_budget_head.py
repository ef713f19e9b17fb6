"""The learned budget head (`mmlm.infer.budget_head`): its features on a tiny random Matryoshka model, the fit,
the stop rule, the margin's calibration, and the study script's mistakes (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmlm.config_utils import load_config
from mmlm.eval.auto import score_budgets
from mmlm.eval.evaluate import prepare_questions, read_jsonl
from mmlm.infer import budget_head, cascade
from mmlm.infer.loading import load_inference_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_and_questions(tmp_path_factory):
    from mmlm.checkpoint import save_model
    from mmlm.data.synth import synthesize
    from mmlm.infer.random_model import random_params
    from mmlm.models.config import model_config_from_dict

    root = tmp_path_factory.mktemp("budget_head")
    config = load_config("configs/tiny.py")  # Matryoshka budgets 1 and 4
    save_model(str(root / "mat"), random_params(model_config_from_dict(config.model), seed=3), config)
    synthesize("shapes", root / "data", 4, seed=5, split="val", progress=False)
    im = load_inference_model(checkpoint=str(root / "mat"))
    return im, prepare_questions(im, read_jsonl(root / "data" / "val_questions.jsonl"), root / "data")


def test_features_are_the_state_the_cascade_reads(model_and_questions):
    im, questions = model_and_questions
    s = score_budgets(im, questions, (1, 4), batch_size=8, max_new_tokens=3, with_features=True)
    width = im.cfg.llm.width
    assert s.features.shape == (len(questions), 1, width + 3)  # one head (at 1 token) below the largest budget
    top1, top2, entropy = s.features[:, 0, width], s.features[:, 0, width + 1], s.features[:, 0, width + 2]
    np.testing.assert_allclose(top1, s.conf[:, 0], rtol=1e-5)  # the cascade's confidence at 1 token
    assert np.all(top2 <= top1) and np.all(entropy >= 0)
    assert score_budgets(im, questions, (1, 4), batch_size=8, max_new_tokens=3).features is None


def test_the_heads_learn_which_questions_a_budget_answers_and_fit_deterministically():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2, 6)).astype(np.float32)
    correct = np.stack([x[:, 0, 0] > 0, x[:, 1, 1] > 0, np.ones(400, bool)], axis=1)  # budget 1 iff feature 0 > 0
    heads = budget_head.fit_heads(x, correct, (1, 4, 16), steps=300)
    p = heads.predict(x)
    assert p.shape == (400, 2, 3)
    assert np.mean((p[:, 0, 0] > 0.5) == correct[:, 0]) > 0.95  # head at 1 token: accuracy there
    assert np.mean((p[:, 1, 1] > 0.5) == correct[:, 1]) > 0.95  # head at 4 tokens: accuracy there
    assert np.all(p[:, :, 2] > 0.9)  # 16 tokens are always right here
    again = budget_head.fit_heads(x, correct, (1, 4, 16), steps=300).predict(x)
    np.testing.assert_array_equal(p, again)


def test_a_question_stops_where_escalating_gains_less_than_the_margin():
    # predicted (n, K - 1 heads, K budgets)
    predicted = np.array([
        [[0.9, 0.9, 0.95], [0.0, 0.9, 0.95]],  # head at 1: 0.9 vs 0.95 -> stops at 1 with margin 0.1
        [[0.3, 0.5, 0.9], [0.0, 0.85, 0.9]],  # escalates at 1; head at 4: 0.85 vs 0.9 -> stops at 4
        [[0.2, 0.4, 0.9], [0.0, 0.5, 0.9]],  # goes on to 16
    ])
    assert budget_head.stop_index(predicted, 0.1).tolist() == [0, 1, 2]
    assert budget_head.stop_index(predicted, 1.0).tolist() == [0, 0, 0]  # any margin of a whole point: smallest
    assert budget_head.stop_index(predicted, -0.5).tolist() == [2, 2, 2]  # a negative margin: always the largest


def test_the_margin_is_the_cheapest_within_a_point_of_the_best():
    budgets = (1, 4, 16)
    # Two questions: the first is right at every budget, the second only at 16 tokens.
    correct = np.array([[True, True, True], [False, False, True]])
    predicted = np.array([[[0.9, 0.9, 0.9], [0, 0.9, 0.9]], [[0.5, 0.6, 0.9], [0, 0.6, 0.9]]])
    margin = budget_head.calibrate_margin(predicted, correct, budgets, grid=(0.0, 0.2, 0.5))
    # 0.0 and 0.2 are both 100% accurate (first at 1, second at 16): 0.2 spends no more tokens, and it is the
    # largest such margin; 0.5 stops the second question at 1 token (50%).
    assert margin == 0.2
    assert cascade.summarize_stops(budget_head.stop_index(predicted, margin), correct, budgets, [0, 0, 0]).accuracy == 1


@pytest.mark.parametrize("args,message", [
    (["--rows", "nope"], "unknown budget-study rows ['nope']"),
    (["--fit_questions", "5"], "at least 100 questions"),
    ([], "no finished budget-study run"),
])
def test_the_study_script_names_a_mistake_with_exit_2(tmp_path, args, message):
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "paper_trends" / "budget_head.py"),
                           "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
