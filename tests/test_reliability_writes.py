"""Nothing a user does destroys an input or an earlier result; media paths stay inside their root.

* Refusals: an output that is (or, through a symlink, resolves to) an input, or an earlier result without
  --overwrite, ends with exit status 2 and one line naming the file; nothing is changed.
* Interruptions: with --overwrite, a SIGTERM while the new content is written leaves the old content
  complete (and a later run replaces it); a SIGTERM during the swap itself is held until the swap is done.
* The workdir lock of `mmlm train`, and a converted checkpoint refused as a workdir.
* `mmlm eval` skips and reports media paths outside --images (`..`, absolute, symlinks).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mmlm
from mmlm import safe_io
from mmlm.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(mmlm.__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """Runs `mmlm ARGV` in-process; (exit code, stderr). argparse errors count as their exit code."""
    from mmlm.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and ": error: " in lines[0], err
    for n in needles:
        assert n in lines[0], (n, err)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _visible(root: Path) -> dict[str, bytes]:
    """`_tree` without hidden entries (the leftovers of an interrupted run, removed by the next one)."""
    return {k: v for k, v in _tree(root).items() if not any(part.startswith(".") for part in Path(k).parts)}


def _paused(argv: list[str], stage: str, env: dict | None = None) -> subprocess.Popen:
    """Starts a process that pauses at `stage` of a safe write; returns once it has reached it."""
    env = dict(env or ENV, **{safe_io.TEST_PAUSE_ENV: stage, safe_io.TEST_PAUSE_ENV + "_SECONDS": "5"})
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    seen = []
    for line in proc.stderr:  # bounded: the process ends by itself after its pause
        seen.append(line)
        if f"mmlm-test-pause: {stage}" in line:
            return proc
    proc.wait(timeout=60)
    raise AssertionError(f"the process never reached {stage!r}: {''.join(seen)[-2000:]}")


# ------------------------------------------------------------------------- the safe-write primitives

WRITER = """
import sys
from pathlib import Path
from mmlm.safe_io import DirectoryReplacement
with DirectoryReplacement(sys.argv[1]) as tmp:
    for i in range(3):
        Path(tmp, f"part{i}").write_text("new " * 1000)
"""


@pytest.mark.parametrize("stage", ["staged", "swap"])
def test_sigterm_during_a_directory_replacement_leaves_old_or_new_complete(tmp_path, stage):
    target = tmp_path / "out"
    target.mkdir()
    for i in range(2):
        (target / f"part{i}").write_text("old")
    old = _tree(target)
    proc = _paused([sys.executable, "-c", WRITER, str(target)], stage)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    got = _tree(target)
    if stage == "staged":  # killed before the swap: the old content, whole
        assert got == old
        assert os.path.isdir(safe_io.sibling(str(target), safe_io.NEW_SUFFIX))  # the unfinished new one
    else:  # the signal waited for the swap: the new content, whole
        assert got == {f"part{i}": ("new " * 1000).encode() for i in range(3)}
    # The next replacement cleans up whatever was left and completes.
    with safe_io.DirectoryReplacement(target) as tmp:
        Path(tmp, "final").write_text("x")
    assert _tree(target) == {"final": b"x"}
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_an_interrupted_two_rename_swap_is_recovered(tmp_path):
    """Killed (SIGKILL) between the two renames of the fallback swap: the next write restores the old one."""
    target = tmp_path / "out"
    old_copy = Path(safe_io.sibling(str(target), safe_io.OLD_SUFFIX))
    old_copy.mkdir()
    (old_copy / "a").write_text("old")
    Path(safe_io.sibling(str(target), safe_io.NEW_SUFFIX)).mkdir()  # the unfinished new content
    note = safe_io.recover_directory(target)
    assert "restored" in note
    assert _tree(target) == {"a": b"old"}
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # Killed after the second rename: the new content is in place, the old copy is deleted.
    old_copy.mkdir()
    (old_copy / "a").write_text("older")
    safe_io.recover_directory(target)
    assert _tree(target) == {"a": b"old"} and sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_file_keeps_the_old_file_on_error_and_follows_symlinks(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with safe_io.atomic_file(path) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f.txt"]
    link = tmp_path / "link.txt"
    link.symlink_to(path)
    safe_io.write_text_atomic(link, "new")
    assert link.is_symlink() and path.read_text() == "new"


def test_check_not_input_resolves_symlinks_and_dots(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(src)
    for out, words in ((link, "is the input"), (tmp_path / "x" / ".." / "src", "is the input"),
                       (link / "sub", "lies inside"), (tmp_path, "lies inside --dst")):
        with pytest.raises(UserError, match=words):
            safe_io.check_not_input(out, "--dst", {"--src": src})
    safe_io.check_not_input(tmp_path / "other", "--dst", {"--src": src, "--vision": None})


def test_confined_path(tmp_path):
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"s")
    (root / "out.png").symlink_to(tmp_path / "secret.png")
    (root / "in.png").symlink_to(root / "a.png")
    assert safe_io.confined_path(root, "d/../a.png") == (root / "a.png").resolve()
    assert safe_io.confined_path(root, "in.png") == (root / "a.png").resolve()
    for rel in ("../secret.png", str(tmp_path / "secret.png"), "out.png", "d/../../secret.png"):
        assert safe_io.confined_path(root, rel) is None, rel


# ------------------------------------------------------------------------- mmlm convert

@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.dirname(__file__))
    from convert_helpers import tiny_llama

    root = tmp_path_factory.mktemp("hf")
    for seed in (0, 1):
        tiny_llama(str(root / f"hf{seed}"), "llama2", seed=seed)
    return root


def test_convert_refuses_outputs_that_are_inputs_or_foreign(tmp_path, hf_models, capsys):
    src = hf_models / "hf0"
    before = _tree(src)
    link = tmp_path / "link"
    link.symlink_to(src)
    code, err = _cli(capsys, "convert", "--from", "hf-llama", "--src", str(src), "--dst", str(link), "--overwrite",
                     "--quiet")
    assert_refused(code, err, "--dst", str(link), "is the input --src")
    # Into another model's directory: refused without --overwrite (not empty), and with it (not a conversion).
    other = hf_models / "hf1"
    other_before = _tree(other)
    code, err = _cli(capsys, "convert", "--from", "hf-llama", "--src", str(src), "--dst", str(other), "--quiet")
    assert code == 2 and str(other) in err and "--overwrite" in err
    code, err = _cli(capsys, "convert", "--from", "hf-llama", "--src", str(src), "--dst", str(other), "--overwrite",
                     "--quiet")
    assert_refused(code, err, str(other), "not an mmlm model checkpoint")
    # --src inside --dst (the source would be replaced as part of it).
    code, err = _cli(capsys, "convert", "--from", "hf-llama", "--src", str(src), "--dst", str(hf_models),
                     "--overwrite", "--quiet")
    assert_refused(code, err, "the input --src", "lies inside --dst")
    assert _tree(src) == before and _tree(other) == other_before


def test_convert_overwrite_interrupted_keeps_the_old_checkpoint(tmp_path, hf_models, capsys):
    from convert_helpers import assert_trees_equal, load_mmlm

    dst = tmp_path / "mm"
    assert _cli(capsys, "convert", "--from", "hf-llama", "--src", str(hf_models / "hf0"), "--dst", str(dst),
                "--quiet")[0] == 0
    old_files, old_params = _tree(dst), load_mmlm(str(dst))[1]
    argv = [sys.executable, "-m", "mmlm.cli", "convert", "--from", "hf-llama", "--src", str(hf_models / "hf1"),
            "--dst", str(dst), "--overwrite", "--quiet"]
    proc = _paused(argv, "staged")  # the new checkpoint is written completely beside the old one
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert _tree(dst) == old_files
    assert_trees_equal(load_mmlm(str(dst))[1], old_params)
    # The rerun replaces it (and removes the interrupted run's leftovers).
    assert _cli(capsys, "convert", "--from", "hf-llama", "--src", str(hf_models / "hf1"), "--dst", str(dst),
                "--overwrite", "--quiet")[0] == 0
    assert _tree(dst) != old_files
    assert sorted(os.listdir(tmp_path)) == ["mm"]
    # An export back over a previous export is swapped in the same way (no mix of old and new shards).
    hf = tmp_path / "hf"
    assert _cli(capsys, "convert", "--to", "hf", "--src", str(dst), "--dst", str(hf), "--max_shard_size", "50KB",
                "--quiet")[0] == 0
    code, err = _cli(capsys, "convert", "--to", "hf", "--src", str(dst), "--dst", str(hf), "--overwrite", "--quiet")
    assert code == 0, err
    assert sorted(f for f in os.listdir(hf) if f.startswith("model")) == ["model.safetensors"]


# ------------------------------------------------------------------------- mmlm data

def test_data_synth_refuses_to_replace_files(tmp_path, capsys):
    out = tmp_path / "d"
    assert _cli(capsys, "data", "synth", "--kind", "shapes", "--out", str(out), "--num", "2", "--image-size", "16")[0] == 0
    (out / "train.json").write_text("my own file")
    code, err = _cli(capsys, "data", "synth", "--kind", "shapes", "--out", str(out), "--num", "2", "--image-size",
                     "16")
    assert_refused(code, err, str(out), "--overwrite")
    assert (out / "train.json").read_text() == "my own file"
    # Another split beside it is fine; --overwrite replaces.
    assert _cli(capsys, "data", "synth", "--kind", "shapes", "--out", str(out), "--num", "2", "--image-size", "16",
                "--split", "val")[0] == 0
    assert _cli(capsys, "data", "synth", "--kind", "shapes", "--out", str(out), "--num", "2", "--image-size", "16",
                "--overwrite")[0] == 0
    assert json.loads((out / "train.json").read_text())[0]["id"].startswith("shapes-train")
    assert not [p for p in out.rglob("*") if "mmlm-tmp" in p.name]


def test_data_build_refuses_to_replace_another_datasets_report(tmp_path, capsys):
    pytest.importorskip("tensorflow_datasets")
    raw, out = tmp_path / "raw", tmp_path / "ds"
    assert _cli(capsys, "data", "synth", "--kind", "shapes", "--out", str(raw), "--num", "2", "--image-size", "16")[0] == 0
    build = ["data", "build", "--json", str(raw / "train.json"), "--images", str(raw), "--out", str(out), "--quiet"]
    assert _cli(capsys, *build, "--name", "first")[0] == 0
    report = (out / "build_report.json").read_bytes()
    code, err = _cli(capsys, *build, "--name", "second")
    assert_refused(code, err, "mmlm_dataset.json", "'first'", "--overwrite")
    assert (out / "build_report.json").read_bytes() == report and not (out / "second").exists()
    # A dataset written over its own input JSON is refused even with --overwrite.
    code, err = _cli(capsys, "data", "build", "--json", str(out / "build_report.json"), "--images", str(raw),
                     "--out", str(out), "--name", "first", "--overwrite", "--quiet")
    assert_refused(code, err, "build_report.json", "is the input")
    assert (out / "build_report.json").read_bytes() == report


def test_data_build_overwrite_interrupted_keeps_the_old_build(tmp_path, capsys):
    pytest.importorskip("tensorflow_datasets")
    raw, out = tmp_path / "raw", tmp_path / "ds"
    for split, n in (("train", "2"), ("more", "3")):
        assert _cli(capsys, "data", "synth", "--kind", "shapes", "--out", str(raw), "--num", n, "--image-size", "16",
                    "--split", split)[0] == 0
    assert _cli(capsys, "data", "build", "--json", str(raw / "train.json"), "--images", str(raw), "--out", str(out),
                "--name", "shapes", "--quiet")[0] == 0
    old = _visible(out)
    argv = [sys.executable, "-m", "mmlm.cli", "data", "build", "--json", str(raw / "more.json"), "--images", str(raw),
            "--out", str(out), "--name", "shapes", "--overwrite", "--quiet"]
    proc = _paused(argv, "staged")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert _visible(out) == old  # dataset, report and manifest: all the old build's
    code, err = _cli(capsys, *argv[3:])
    assert code == 0, err
    meta = json.loads((out / "mmlm_dataset.json").read_text())
    assert meta["splits"]["train"]["num_examples"] == 3
    assert sorted(os.listdir(out)) == ["build_report.json", "mmlm_dataset.json", "shapes"]


# ------------------------------------------------------------------------- mmlm train

HOLDER = """
import sys, time
from mmlm.train.lock import WorkdirLock
lock = WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_train_lock_refuses_a_second_run_and_takes_over_a_stale_lock(tmp_path, capsys, caplog):
    from mmlm.train.lock import LOCK_FILE, WorkdirLock

    work = tmp_path / "w"
    work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(work)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = _cli(capsys, "train", "--config", "configs/tiny.py", "--workdir", str(work))
        assert_refused(code, err, str(work), f"pid {holder.pid}", "in use")
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays behind
        holder.wait(timeout=30)
    assert json.loads((work / LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="mmlm.train.lock"):
        with WorkdirLock(str(work)):
            assert json.loads((work / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"pid {holder.pid}" in caplog.text and "stale" in caplog.text
    assert not (work / LOCK_FILE).exists()  # released and removed


def test_train_lock_is_released_on_ctrl_c(tmp_path, capsys, monkeypatch):
    from mmlm.train import trainer
    from mmlm.train.lock import LOCK_FILE

    seen = []

    def interrupted(config, workdir, *rest):
        seen.append(os.path.exists(os.path.join(workdir, LOCK_FILE)))
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_train_locked", interrupted)
    code, err = _cli(capsys, "train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"))
    assert code == 130 and seen == [True] and "Traceback" not in err
    assert not (tmp_path / "w" / LOCK_FILE).exists()


def test_train_refuses_a_converted_checkpoint_as_workdir(tmp_path, capsys):
    from mmlm.checkpoint import save_config
    from mmlm.config_utils import load_config

    ckpt = tmp_path / "converted"
    save_config(str(ckpt), load_config("configs/tiny.py"))
    (ckpt / "params").mkdir()
    before = (ckpt / "config.json").read_bytes()
    code, err = _cli(capsys, "train", "--config", "configs/tiny.py", "--workdir", str(ckpt))
    assert_refused(code, err, str(ckpt), "--init_from")
    assert (ckpt / "config.json").read_bytes() == before
    assert sorted(os.listdir(ckpt)) == ["config.json", "params"]


# ------------------------------------------------------------------------- mmlm eval and chat

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from mmlm.checkpoint import save_model
    from mmlm.config_utils import load_config
    from mmlm.data.synth import synthesize
    from mmlm.infer.random_model import random_params
    from mmlm.models.config import model_config_from_dict

    root = tmp_path_factory.mktemp("model")
    config = load_config("configs/tiny.py")
    config.data.max_text_len = 128  # the synthetic question with its template is longer than tiny's 32 tokens
    save_model(str(root / "ckpt"), random_params(model_config_from_dict(config.model), seed=0), config)
    images = root / "images"
    synthesize("shapes", images, 1, seed=0, split="test", image_size=32, progress=False)
    good = json.loads((images / "test_questions.jsonl").read_text().splitlines()[0])
    (root / "secret.png").write_bytes((images / good["image"]).read_bytes())
    (images / "leak.png").symlink_to(root / "secret.png")
    rows = [good,
            {"question_id": "dots", "image": "../secret.png", "text": "What?"},
            {"question_id": "absolute", "image": str(root / "secret.png"), "text": "What?"},
            {"question_id": "symlink", "image": "leak.png", "text": "What?"}]
    (root / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, good


def test_eval_skips_and_reports_media_outside_images(tiny_model, capsys, monkeypatch):
    root, good = tiny_model
    opened = []
    import mmlm.eval.evaluate as evaluate

    real = evaluate.load_media
    monkeypatch.setattr(evaluate, "load_media", lambda im, path, *a: opened.append(str(path)) or real(im, path, *a))
    out = root / "eval"
    code, err = _cli(capsys, "eval", "--checkpoint", str(root / "ckpt"), "--data", str(root / "q.jsonl"),
                     "--images", str(root / "images"), "--out", str(out), "--max_new_tokens", "1", "--no_progress")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["count"] == 1
    skipped = {s["question_id"]: s["reason"] for s in metrics["skipped"]}
    assert sorted(skipped) == ["absolute", "dots", "symlink"]
    assert all("path_escapes_root" in r for r in skipped.values())
    assert "3 skipped: 3 media path outside its root" in err
    assert not any("secret" in p for p in opened) and len(opened) == 1
    # The results stay: a second evaluation into the same --out is refused, and --data may not be a result file.
    answers = (out / "answers.jsonl").read_bytes()
    code, err = _cli(capsys, "eval", "--checkpoint", str(root / "ckpt"), "--data", str(root / "q.jsonl"),
                     "--images", str(root / "images"), "--out", str(out))
    assert_refused(code, err, str(out), "answers.jsonl", "--overwrite")
    code, err = _cli(capsys, "eval", "--checkpoint", str(root / "ckpt"), "--data", str(out / "answers.jsonl"),
                     "--out", str(out), "--overwrite")
    assert_refused(code, err, "answers.jsonl", "is the input --data")
    assert (out / "answers.jsonl").read_bytes() == answers
    # Nothing left to answer: one line naming the questions and why.
    only_escaping = root / "escaping.jsonl"
    only_escaping.write_text("".join(line + "\n" for line in (root / "q.jsonl").read_text().splitlines()[1:]))
    code, err = _cli(capsys, "eval", "--checkpoint", str(root / "ckpt"), "--data", str(only_escaping),
                     "--images", str(root / "images"), "--out", str(root / "eval_none"))
    assert_refused(code, err, "'dots'", "path_escapes_root", "../secret.png")
    assert not (root / "eval_none").exists()


def test_eval_overwrite_replaces_the_whole_earlier_result_set(tiny_model, capsys):
    """Earlier answers of a budget this run does not evaluate are removed, not mixed with the new ones."""
    from mmlm.eval.evaluate import EvalResult, ResultsWriter

    out = root_out = tiny_model[0] / "eval_replace"
    out.mkdir()
    (out / "answers_m16.jsonl").write_text("old\n")
    (out / "metrics.json").write_text("{}")
    row = {"num_vision_tokens": 1, "accuracy": 1.0, "vqa_accuracy": 1.0, "mc_accuracy": None, "count": 1}
    writer = ResultsWriter(root_out, replace=True)
    writer(1, [{"question_id": "a"}])
    assert (out / "metrics.json").read_text() == "{}"  # untouched while the run is in progress
    assert not (out / "answers_m1.jsonl").exists()
    writer.finish(EvalResult([row], {1: [{"question_id": "a"}]}), {})
    assert sorted(os.listdir(out)) == ["answers.jsonl", "answers_m1.jsonl", "metrics.json"]


def test_chat_compression_map_never_replaces_an_input(tiny_model, capsys, tmp_path):
    root, good = tiny_model
    image = root / "images" / good["image"]
    before = image.read_bytes()
    base = ["chat", "--checkpoint", str(root / "ckpt"), "--image", str(image), "--prompt", "q"]
    code, err = _cli(capsys, *base, "--save_compression_map", str(image), "--overwrite")
    assert_refused(code, err, "--save_compression_map", str(image), "is the input --image")
    link = tmp_path / "map.png"
    link.symlink_to(image)
    code, err = _cli(capsys, *base, "--save_compression_map", str(link), "--overwrite")
    assert_refused(code, err, str(link), "is the input --image")
    code, err = _cli(capsys, *base, "--save_compression_map", str(root / "ckpt" / "config.json"), "--overwrite")
    assert_refused(code, err, "config.json", "lies inside the input --checkpoint")
    earlier = tmp_path / "earlier.png"
    earlier.write_bytes(b"an earlier map")
    code, err = _cli(capsys, *base, "--save_compression_map", str(earlier))
    assert_refused(code, err, str(earlier), "--overwrite")
    assert image.read_bytes() == before and earlier.read_bytes() == b"an earlier map"
