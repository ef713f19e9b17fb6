"""mmlm as an lmms-eval model (`mmlm.eval.lmms_eval`) on a tiny random checkpoint, offline.

Skipped when lmms-eval (the `eval` extra) is not installed.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageFile

try:
    import lmms_eval.api.model  # noqa: F401
except Exception as e:  # not installed, or an install that cannot import (e.g. a torch / torchvision mismatch)
    pytest.skip(f"lmms-eval (the `eval` extra) is not importable: {e}", allow_module_level=True)

import jax  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402

from mmlm.checkpoint import save_model  # noqa: E402
from mmlm.cli import eval as eval_cli  # noqa: E402
from mmlm.config_utils import load_config  # noqa: E402
from mmlm.data.synth import synthesize  # noqa: E402
from mmlm.errors import UserError  # noqa: E402
from mmlm.eval.evaluate import evaluate, prepare_questions, read_jsonl  # noqa: E402
from mmlm.eval.lmms_eval import TASKS_DIR, questions  # noqa: E402
from mmlm.eval.lmms_eval.model import MMLM, cut_at_stop_strings, generation_settings  # noqa: E402
from mmlm.infer.batching import make_batch  # noqa: E402
from mmlm.infer.loading import encode_question, load_media  # noqa: E402
from mmlm.infer.random_model import random_params  # noqa: E402
from mmlm.models.config import model_config_from_dict  # noqa: E402
from mmlm.models.llava_mini import LlavaMini  # noqa: E402

# Importing lmms-eval's task module sets PIL's ImageFile.LOAD_TRUNCATED_IMAGES for the whole process, and
# pytest collects every test module into each worker: put PIL's default back, so that the other modules'
# checks that a truncated image is refused do not depend on which modules share the worker.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@pytest.fixture(autouse=True)
def _pil_refuses_truncated_images():
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # lmms-eval modules imported lazily during a test set it again


ROOT = Path(__file__).resolve().parents[1]
TASK = "mmlm_questions"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    config = load_config(str(ROOT / "configs" / "tiny.py"))
    config.data.max_text_len = 128  # room for the appended options of the multiple-choice question
    save_model(str(root / "ckpt"), random_params(model_config_from_dict(config.model), seed=5), config)
    data = root / "data"
    synthesize("shapes", data, 3, seed=13, split="test", progress=False)
    synthesize("moving_shapes", data, 1, seed=13, split="vtest", progress=False)
    lines = [json.loads(x) for x in (data / "test_questions.jsonl").read_text().splitlines()]
    lines += [json.loads(x) for x in (data / "vtest_questions.jsonl").read_text().splitlines()]
    lines.append({"question_id": "mc-1", "image": lines[0]["image"], "text": "Which color?",
                  "options": ["red", "blue"], "answer": "B"})
    lines.append({"question_id": "text-1", "text": "Say yes.", "answer": "yes"})
    (data / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root, data / "q.jsonl", data


@pytest.fixture(scope="module")
def model(setup):
    root, _, _ = setup
    return MMLM.create_from_arg_string(f"checkpoint={root / 'ckpt'},num_vision_tokens=1,max_frames=2",
                                       {"batch_size": 3, "max_batch_size": None, "device": None})


@pytest.fixture
def docs(setup, model, monkeypatch):
    _, qfile, data = setup
    monkeypatch.setenv(questions.QUESTIONS_ENV, str(qfile))
    monkeypatch.setenv(questions.IMAGES_ENV, str(data))
    docs = questions.load_documents()
    model.task_dict = {TASK: {"test": docs}}
    return docs


GREEDY = {"max_new_tokens": 6, "until": []}  # one setting for all tests: their batches share compiled programs


def _request(kind: str, args: tuple, doc_id: int = 0) -> Instance:
    return Instance(request_type=kind, arguments=args, idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def _generate_requests(docs, gen_kwargs):
    return [_request("generate_until", (questions.doc_to_text(d), dict(gen_kwargs), questions.doc_to_visual, i,
                                        TASK, "test"), i) for i, d in enumerate(docs)]


def test_generate_until_equals_mmlm_greedy_answers_and_honours_until(setup, model, docs):
    _, qfile, data = setup
    out = model.generate_until(_generate_requests(docs, GREEDY))
    # mmlm's own evaluator (greedy KV-cache `generate`) on the same file; the same batch shapes share compiled programs.
    im = model.im
    result = evaluate(im, prepare_questions(im, read_jsonl(qfile), data), [1], batch_size=3, max_new_tokens=6,
                      max_frames=2, progress=False)
    assert [o.strip() for o in out] == [line["text"] for line in result.answers[1]]
    assert {d["kind"] for d in docs} == {"image", "video", ""}

    j, text = next((j, t) for j, t in enumerate(out) if len(t.strip()) >= 3)
    stop = text.strip()[1:3]
    cut = model.generate_until(_generate_requests(docs[j:j + 1], {**GREEDY, "until": [stop, "\n\n"]}))
    assert cut == [text[: text.find(stop)]] and stop not in cut[0]
    assert cut_at_stop_strings("a.b\nc", [".", "\n"]) == "a" and cut_at_stop_strings("abc", []) == "abc"

    images = [d for d in docs if d["kind"] == "image"]
    sampled = model.generate_until(_generate_requests(images, {"max_new_tokens": 6, "do_sample": True,
                                                               "temperature": 1.0, "top_p": 0.9}))
    assert len(sampled) == len(images) and all(isinstance(s, str) for s in sampled)


def test_generation_settings():
    s, until = generation_settings({"max_new_tokens": 5, "temperature": 0, "do_sample": False, "until": "\n"},
                                   128, "here")
    assert (s.max_new_tokens, s.temperature, s.top_p, until) == (5, 0.0, 1.0, ("\n",))
    s, _ = generation_settings({"temperature": 0.7, "top_p": 0.5}, 128, "here")  # lmms-eval's other convention
    assert (s.max_new_tokens, s.temperature, s.top_p) == (128, 0.7, 0.5)
    s, _ = generation_settings({"do_sample": True}, 128, "here")
    assert s.temperature == 1.0
    with pytest.raises(UserError, match="beam search"):
        generation_settings({"num_beams": 3}, 128, "here")


def _reference_loglikelihood(model, context, continuation, pixels):
    """Sum over the continuation's tokens of log_softmax(logits) from one unbatched forward of `LlavaMini`."""
    im = model.im
    has_media = pixels is not None
    ids, fuse, labels = model._scored_ids(context, continuation, has_media, "ref")
    prompt = encode_question(im, context, has_media)
    assert ids[: len(prompt)] == prompt  # the context is tokenised exactly as generation's prompt
    cont = [t for t in labels if t != -100]
    assert labels[: len(prompt)] == [-100] * len(prompt) and ids[len(prompt):] == cont
    batch = make_batch(im.cfg, [ids], [pixels], pad_id=im.tokenizer.pad_id, fuse_masks=[fuse])
    out = LlavaMini(im.cfg).apply({"params": im.params}, batch, 1)
    logp = np.asarray(jax.nn.log_softmax(out["logits"][0].astype(np.float32), axis=-1))
    text_index = np.asarray(out["text_index"][0])
    total, greedy = 0.0, True
    for t in range(len(prompt), len(ids)):
        slot = int(np.flatnonzero(text_index == t - 1)[0])  # the position that predicts token t
        total += float(logp[slot, ids[t]])
        greedy &= int(np.argmax(logp[slot])) == ids[t]
    return total, greedy, len(cont)


def test_loglikelihood_equals_the_forward_logits(setup, model, docs):
    image_doc = next(i for i, d in enumerate(docs) if d["kind"] == "image")
    video_doc = next(i for i, d in enumerate(docs) if d["kind"] == "video")
    greedy_answer = model.generate_until(_generate_requests(docs[image_doc:image_doc + 1], GREEDY))[0]
    cases = [(image_doc, "What color is the circle?", " red"),
             (image_doc, "Is there a square?", " yes, there is one square"),
             (video_doc, "Which way does it move?", " left"),
             (None, "Say yes.", " yes"),
             (None, "", " anything at all"),  # an empty context
             (image_doc, questions.doc_to_text(docs[image_doc]), greedy_answer.strip())]
    requests = []
    for i, (doc, context, cont) in enumerate(cases):
        if doc is None:
            requests.append(_request("loglikelihood", (context, cont), i))
        else:
            requests.append(_request("loglikelihood", (context, cont, questions.doc_to_visual, doc, TASK, "test"),
                                     doc))
    scores = model.loglikelihood(requests)  # batch_size 3: padded rows, mixed lengths
    for (doc, context, cont), (logprob, is_greedy) in zip(cases, scores):
        pixels = None
        if doc is not None:
            d = docs[doc]
            pixels = load_media(model.im, d["media"], d["kind"], max_frames=2)
        ref, ref_greedy, n = _reference_loglikelihood(model, context, cont, pixels)
        assert n >= 1
        assert logprob == pytest.approx(ref, abs=1e-4)
        assert logprob < 0 and is_greedy == ref_greedy
    assert scores[-1][1]  # the model's own greedy answer is the greedy continuation


def test_several_visuals_in_one_prompt_are_refused_or_read_as_frames(model, docs):
    from mmlm.data import preprocess

    image_doc = next(i for i, d in enumerate(docs) if d["kind"] == "image")
    video_doc = next(i for i, d in enumerate(docs) if d["kind"] == "video")

    def two_images(doc):
        return questions.doc_to_visual(doc) * 2

    req = _request("generate_until", ("Compare them.", {"max_new_tokens": 2}, two_images, image_doc, TASK, "test"))
    with pytest.raises(UserError, match="one image or one video.*multi_image=frames"):
        model.generate_until([req])

    # multi_image=frames: a video's frames given as images answer as the video itself does.
    def frames(doc):
        return preprocess.decode_video(doc["media"], max_frames=2, target_fps=model.im.video_fps).frames

    gen = GREEDY
    as_video = _request("generate_until", ("Which way?", gen, questions.doc_to_visual, video_doc, TASK, "test"))
    as_images = _request("generate_until", ("Which way?", gen, frames, video_doc, TASK, "test"))
    model.multi_image = "frames"
    try:
        assert len(frames(docs[video_doc])) == 2
        assert model.generate_until([as_images]) == model.generate_until([as_video])
    finally:
        model.multi_image = "error"


def test_bad_model_args_are_clear(setup):
    root, _, _ = setup
    with pytest.raises(UserError, match="exactly one of workdir=DIR .* or checkpoint=DIR"):
        MMLM.create_from_arg_string("num_vision_tokens=1", {"batch_size": 1})
    with pytest.raises(UserError, match=r"num_vision_tokens=16 .*Supported budgets: \[1, 4\]"):
        MMLM.create_from_arg_string(f"checkpoint={root / 'ckpt'},num_vision_tokens=16", {"batch_size": 1})
    with pytest.raises(UserError, match="unknown num_tokens"):
        MMLM.create_from_arg_string(f"checkpoint={root / 'ckpt'},num_tokens=4", {"batch_size": 1})
    with pytest.raises(UserError, match="is not a directory"):
        MMLM.create_from_arg_string(f"workdir={root / 'nowhere'}", {"batch_size": 1})
    with pytest.raises(UserError, match="multi_image='concat'"):
        MMLM.create_from_arg_string(f"checkpoint={root / 'ckpt'},multi_image=concat", {"batch_size": 1})
    with pytest.raises(UserError, match="weights='fp8'"):
        MMLM.create_from_arg_string(f"checkpoint={root / 'ckpt'},weights=fp8", {"batch_size": 1})


def test_task_refuses_missing_env_and_media(tmp_path, monkeypatch):
    monkeypatch.delenv(questions.QUESTIONS_ENV, raising=False)
    with pytest.raises(UserError, match="set MMLM_QUESTIONS"):
        questions.load_documents()
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": "gone-3", "image": "nope.png", "text": "q", "answer": "a"}) + "\n")
    monkeypatch.setenv(questions.QUESTIONS_ENV, str(q))
    with pytest.raises(UserError, match="question 'gone-3'.*nope.png.*does not exist"):
        questions.load_documents()


def _entry_point_dir(tmp: Path) -> Path:
    """A dist-info declaring pyproject.toml's `lmms_eval.models` entry point, for a checkout not pip-installed."""
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    info = tmp / "site" / "mmlm_checkout_entry_points-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mmlm-checkout-entry-points\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return info.parent


def _mmlm_eval_accuracy(root: Path, qfile: Path, data: Path, out: Path, capsys) -> tuple[float, list[dict]]:
    assert eval_cli.main(["--checkpoint", str(root / "ckpt"), "--data", str(qfile), "--images", str(data),
                          "--out", str(out), "--num_vision_tokens", "1", "--no_progress"]) == 0
    capsys.readouterr()
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    return json.loads((out / "metrics.json").read_text())["accuracy"], answers


def test_cli_offline_exact_match_equals_mmlm_eval(setup, tmp_path, capsys):
    root, qfile, data = setup
    # A random model's answers are rarely right: make every other open question's reference the model's own answer
    # (from `mmlm eval`), so that the two figures compared below are neither 0 nor 1.
    _, answers = _mmlm_eval_accuracy(root, qfile, data, tmp_path / "eval0", capsys)
    rows = read_jsonl(qfile)
    for i, (row, line) in enumerate(zip(rows, answers)):
        if i % 2 == 0 and not row.get("options"):
            row["answer"] = line["text"]
    q2 = tmp_path / "q2.jsonl"
    q2.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours, _ = _mmlm_eval_accuracy(root, q2, data, tmp_path / "eval", capsys)
    assert 0 < ours < 1

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu",
               MMLM_QUESTIONS=str(q2), MMLM_IMAGES=str(data), HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(_entry_point_dir(tmp_path))]
                                          + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mmlm",
           "--model_args", f"checkpoint={root / 'ckpt'},num_vision_tokens=1", "--tasks", TASK,
           "--include_path", TASKS_DIR, "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    found = glob.glob(str(tmp_path / "out" / "**" / "*results*.json"), recursive=True)
    assert proc.returncode == 0 and found, log[-4000:]
    results = json.loads(Path(found[0]).read_text())
    assert results["results"][TASK]["exact_match,none"] == pytest.approx(ours, abs=1e-9)
    assert results["n-samples"][TASK]["effective"] == len(rows)


# ------------------------------------------------------------------ num_vision_tokens=auto (the cascade)

def _auto_model(root: Path, extra: str = "") -> MMLM:
    return MMLM.create_from_arg_string(f"checkpoint={root / 'ckpt'},num_vision_tokens=auto,max_frames=2{extra}",
                                       {"batch_size": 3, "max_batch_size": None, "device": None})


def _split_threshold(conf: np.ndarray) -> float:
    """A threshold that sends some questions on to the next budget and stops the others, midway in the widest
    gap between their first-budget confidences (far from every one: batch shapes cannot tip a question over)."""
    c = np.sort(np.unique(conf))
    i = int(np.argmax(np.diff(c)))
    return float((c[i] + c[i + 1]) / 2)


def test_auto_generate_until_answers_as_mmlm_eval_auto(setup, model, docs, capsys):
    from mmlm.eval.auto import cascade_row, score_budgets

    root, qfile, data = setup
    im = model.im
    # `mmlm eval --num_vision_tokens auto --auto_threshold T --batch_size 3 --max_frames 2`'s answers (`run_auto`).
    scored = score_budgets(im, prepare_questions(im, read_jsonl(qfile), data), (1, 4), batch_size=3,
                           max_new_tokens=GREEDY["max_new_tokens"], max_frames=2)
    media = [i for i, d in enumerate(docs) if d["kind"]]
    threshold = _split_threshold(scored.conf[media, 0])
    _, lines = cascade_row(scored, threshold)
    chosen = {line["question_id"]: line["num_vision_tokens"] for line in lines}
    assert {chosen[docs[i]["question_id"]] for i in media} == {1, 4}  # both budgets answer some questions

    auto = _auto_model(root, f",auto_threshold={threshold}")
    auto.task_dict = model.task_dict
    assert (auto.auto_budgets, auto.auto_threshold, auto.num_vision_tokens) == ((1, 4), threshold, None)
    out = auto.generate_until(_generate_requests(docs, GREEDY))
    assert [o.strip() for o in out] == [line["text"] for line in lines]
    # The same histogram over the requests with media (one without media: no vision tokens, counted as 0).
    want = {m: sum(chosen[docs[i]["question_id"]] == m for i in media) for m in (1, 4)}
    assert auto.budgets_used["generate_until"] == {**want, 0: len(docs) - len(media)}
    assert "num_vision_tokens=auto (threshold" in capsys.readouterr().err

    # loglikelihood: each continuation scored at the budget the cascade stops at for its context (the question as
    # generate_until answers it), exactly the fixed-budget score there; the options of one context share it.
    cases = [(i, cont) for i in media if docs[i]["kind"] == "image" for cont in (" red", " blue")]
    requests = [_request("loglikelihood", (questions.doc_to_text(docs[i]), cont, questions.doc_to_visual, i, TASK,
                                           "test"), i) for i, cont in cases]
    requests.append(_request("loglikelihood", ("Say yes.", " yes"), 0))  # no media
    scores = auto.loglikelihood(requests)
    try:
        for m in (1, 4):
            model.num_vision_tokens = m
            fixed = model.loglikelihood(requests)
            for (i, _), got, ref in zip(cases, scores, fixed):
                if chosen[docs[i]["question_id"]] == m:
                    assert got[0] == pytest.approx(ref[0], abs=1e-5) and got[1] == ref[1]
            assert scores[-1][0] == pytest.approx(fixed[-1][0], abs=1e-5)
    finally:
        model.num_vision_tokens = 1
    images = sorted({i for i, _ in cases})
    assert sum(auto.budgets_used["loglikelihood"].values()) == len(images)  # one cascade per context
    assert auto.budgets_used["loglikelihood"] == {m: sum(chosen[docs[i]["question_id"]] == m for i in images)
                                                  for m in (1, 4) if any(chosen[docs[i]["question_id"]] == m
                                                                         for i in images)}


def test_auto_calibrates_its_threshold_as_mmlm_eval(setup, model, tmp_path, capsys, monkeypatch):
    from mmlm.eval.auto import calibrate

    root, qfile, _ = setup
    synthesize("shapes", tmp_path / "cal", 4, seed=21, split="train", progress=False)
    cal = tmp_path / "cal" / "train_questions.jsonl"
    # What `mmlm eval --calibration_data` fits (`run_auto`), with the lmms-eval model's batch size and answer length.
    want = calibrate(model.im, prepare_questions(model.im, read_jsonl(cal), cal.parent), (1, 4), batch_size=3,
                     max_new_tokens=GREEDY["max_new_tokens"])
    monkeypatch.setenv(questions.QUESTIONS_ENV, str(qfile))  # the evaluated questions: checked disjoint
    auto = _auto_model(root, f",calibration_data={cal},max_new_tokens={GREEDY['max_new_tokens']}")
    assert auto.auto_threshold == want["threshold"] and 0 < want["threshold"] < 1
    assert auto.calibration["questions"] == want["questions"] == 4
    assert "calibrated on 4 questions" in capsys.readouterr().err


def test_auto_mistakes_are_clear(setup, tmp_path, monkeypatch):
    root, qfile, _ = setup
    config = load_config(str(ROOT / "configs" / "tiny.py"))
    config.model.compressor.budgets = ()  # one fixed budget: nothing to cascade over
    save_model(str(tmp_path / "fixed"), random_params(model_config_from_dict(config.model), seed=5), config)
    with pytest.raises(UserError, match="num_vision_tokens=auto needs a Matryoshka model"):
        MMLM.create_from_arg_string(f"checkpoint={tmp_path / 'fixed'},num_vision_tokens=auto", {"batch_size": 1})
    for bad in ("1.5", "0", "1", "-0.2", "nan"):
        with pytest.raises(UserError, match="auto_threshold .*strictly between 0 and 1"):
            _auto_model(root, f",auto_threshold={bad}")
    with pytest.raises(UserError, match="auto_threshold='most' must be a number strictly between 0 and 1"):
        _auto_model(root, ",auto_threshold=most")
    with pytest.raises(UserError, match="go with num_vision_tokens=auto"):
        MMLM.create_from_arg_string(f"checkpoint={root / 'ckpt'},num_vision_tokens=1,auto_threshold=0.5",
                                    {"batch_size": 1})
    with pytest.raises(UserError, match="not both"):
        _auto_model(root, f",auto_threshold=0.5,calibration_data={qfile}")
    with pytest.raises(UserError, match="does not exist"):
        _auto_model(root, f",calibration_data={tmp_path / 'none.jsonl'}")
    monkeypatch.setenv(questions.QUESTIONS_ENV, str(qfile))
    with pytest.raises(UserError, match="overlap the evaluation questions"):
        _auto_model(root, f",calibration_data={qfile}")  # calibrating on the questions being scored
