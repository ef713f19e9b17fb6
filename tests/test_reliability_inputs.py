"""Inputs that used to give silent wrong answers or tracebacks: each is now right, or one line and exit 2.

Silent wrong answers: EXIF orientation, non-finite / out-of-range numbers (flags and config fields), a
single-file checkpoint next to a stale shard index, weights holding NaN, conversations the text length
cuts. Tracebacks: deeply nested JSON, damaged config.json / tokenizer / dataset manifest, a batch larger
than the dataset, negative seeds, an empty synthetic dataset, `<image>` typed into a chat, a full disk
during a checkpoint save, Ctrl-C in `data build` and `eval`, `--json` output that is a directory.

The CLIs run in-process (`mmlm.cli.main`); only the Ctrl-C case starts a subprocess (a real SIGINT).
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmlm.cli import main as mmlm_main
from model_helpers import tiny_checkpoint_and_image

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """(exit status, stdout + stderr) of `mmlm ARGV` run in-process; argparse errors included."""
    try:
        rc = mmlm_main(list(argv))
    except SystemExit as e:  # argparse: usage + one error line, status 2
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def assert_user_error(rc: int, out: str, *named: str) -> None:
    assert rc == 2, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    for text in named:
        assert text in out, f"{text!r} not in:\n{out[-2000:]}"


def _record(i: int, answer: str = "a", question: str = "q", image: str | None = None) -> dict:
    human = ("<image>\n" if image else "") + question
    rec = {"id": f"r{i}", "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}
    if image:
        rec["image"] = image
    return rec


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random model checkpoint, a test image and a one-question JSONL."""
    root = tiny_checkpoint_and_image(tmp_path_factory.mktemp("inputs"))
    (root / "q.jsonl").write_text(json.dumps({"question_id": "q1", "image": "img.png", "text": "q?",
                                              "answer": "a"}) + "\n")
    return root


# ======================================================================= silent wrong answers

# ------------------------------------------------------------------------------ EXIF orientation

@pytest.mark.parametrize("orientation,turn", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied_by_the_shared_decoder(tmp_path, orientation, turn):
    """A phone photo (JPEG, pixels stored sideways, rotation in the EXIF tag) decodes upright, everywhere
    media are decoded: chat, eval and the server (`load_image_pixels`), data build and the pipeline
    (`decode_image`)."""
    from mmlm.data import preprocess

    stored = np.zeros((24, 40, 3), np.uint8)
    stored[:8, :10] = (255, 0, 0)  # a red corner: any rotation moves it
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif)
    data = buf.getvalue()
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # the stored (sideways) pixels
    got = np.asarray(preprocess.decode_image(data))
    np.testing.assert_array_equal(got, np.rot90(raw, turn))
    assert got.shape[:2] == ((40, 24) if orientation in (6, 8) else (24, 40))
    (tmp_path / "photo.jpg").write_bytes(data)
    np.testing.assert_array_equal(np.asarray(preprocess.load_image(tmp_path / "photo.jpg")), got)


def test_exif_orientation_reaches_chat_pixels(model, tmp_path):
    """The chat/eval/server loader sees the upright photo: pixels equal those of the same image stored upright."""
    from mmlm.checkpoint import load_config_json, load_model_params
    from mmlm.infer.loading import inference_model, load_image_pixels

    upright = np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": store it rotated the other way
    Image.fromarray(np.rot90(upright, 1)).save(tmp_path / "sideways.png", exif=exif)
    im = inference_model(load_config_json(str(model / "ckpt")), load_model_params(str(model / "ckpt")), "m")
    np.testing.assert_array_equal(load_image_pixels(im, tmp_path / "sideways.png"),
                                  load_image_pixels(im, tmp_path / "upright.png"))


# ---------------------------------------------------------------------- numeric flags and fields

NUMERIC_FLAGS = [
    # (argv, text the message must name)
    (["chat", "--checkpoint", "C", "--image", "I", "--temperature", "nan"], "--temperature: expected a number >= 0, got 'nan'"),
    (["chat", "--checkpoint", "C", "--image", "I", "--temperature", "-0.5"], "--temperature"),
    (["chat", "--checkpoint", "C", "--image", "I", "--top_p", "inf"], "--top_p: expected a number in (0, 1]"),
    (["chat", "--checkpoint", "C", "--image", "I", "--top_p", "0"], "--top_p"),
    (["chat", "--checkpoint", "C", "--image", "I", "--seed", "-1"], "--seed: expected an integer in [0, 4294967295]"),
    (["chat", "--checkpoint", "C", "--image", "I", "--max_frames", "-3"], "--max_frames"),
    (["chat", "--checkpoint", "C", "--image", "I", "--max_new_tokens", "0"], "--max_new_tokens"),
    (["chat", "--checkpoint", "C", "--image", "I", "--num_vision_tokens", "-4"], "--num_vision_tokens"),
    (["eval", "--checkpoint", "C", "--data", "D", "--out", "O", "--max_frames", "-1"], "--max_frames: expected an integer >= 1, got '-1'"),
    (["eval", "--checkpoint", "C", "--data", "D", "--out", "O", "--batch_size", "0"], "--batch_size"),
    (["eval", "--checkpoint", "C", "--data", "D", "--out", "O", "--limit", "nan"], "--limit"),
    (["eval", "--workdir", "W", "--data", "D", "--out", "O", "--step", "-2"], "--step"),
    (["data", "synth", "--kind", "shapes", "--out", "O", "--num", "2", "--seed", "-1"], "--seed"),
    (["data", "build", "--json", "J", "--out", "O", "--video-fps", "nan"], "--video-fps"),
    (["data", "build", "--json", "J", "--out", "O", "--max-text-len", "1"], "--max-text-len"),
    (["data", "inspect", "D", "--max-text-len", "0"], "--max-text-len"),
    (["summary", "--config", TINY, "--text_len", "0"], "--text_len"),
    (["train", "--config", TINY, "--workdir", "W", "--num_processes", "0"], "--num_processes"),
    (["convert", "--from", "hf-llama", "--src", "S", "--dst", "D", "--hd_grid", "0"], "--hd_grid"),
    (["verify", "--hf", "S", "--mmlm", "D", "--atol", "nan"], "--atol"),
    (["verify", "--hf", "S", "--mmlm", "D", "--seed", "-5"], "--seed"),
    (["bench", "video-memory", "--config", TINY, "--memory_gib", "inf"], "--memory_gib"),
    (["bench", "compress", "--seed", "-1"], "--seed"),
    (["bench", "compress", "--repeats", "0"], "--repeats"),
    (["bench", "data", "--batch-size", "-8"], "--batch-size"),
    (["bench", "latency", "--runs", "0"], "--runs"),
    (["bench", "flops", "--config", TINY, "--text_tokens", "-1"], "--text_tokens"),
    (["compile", "--config", TINY, "--topology", "v5e-8", "--frames", "0"], "--frames"),
    (["serve", "--checkpoint", "C", "--step", "-1"], "--step: expected an integer >= 0"),
    (["serve", "--checkpoint", "C", "--admit_wait_ms", "nan"], "--admit_wait_ms must be in [0, 10000], got nan"),
    (["serve", "--checkpoint", "C", "--auto_threshold", "1.5"], "--auto_threshold 1.5: must be strictly between 0 and 1"),
]


@pytest.mark.parametrize("argv,named", NUMERIC_FLAGS, ids=[" ".join(a[:2] + a[-2:]) for a, _ in NUMERIC_FLAGS])
def test_numeric_flags_are_finite_and_in_range(capsys, argv, named):
    rc, out = run_cli(capsys, *argv)
    assert_user_error(rc, out, named)


CONFIG_FIELDS = [
    ("--config.seed=-1", "config.seed must be in [0, 4294967295], got -1"),
    ("--config.model.llm.rms_eps=0.0", "config.model.llm.rms_eps must be > 0"),
    ("--config.model.vision.layer_norm_eps=0.0", "config.model.vision.layer_norm_eps"),
    ("--config.model.compressor.ln_eps=0.0", "config.model.compressor.ln_eps"),
    ("--config.model.llm.rope_theta=0.0", "config.model.llm.rope_theta"),
    ("--config.model.llm.rms_eps=nan", "config.model.llm.rms_eps"),
    ("--config.model.init_std=-0.02", "model.init_std must be >= 0"),
    ("--config.model.loss_chunk=-1", "model.loss_chunk must be >= 0"),
    ("--config.optim.learning_rate.llm=inf", "config.optim.learning_rate.llm"),
    ("--config.synthetic.num_train=0", "config.synthetic.num_train must be >= 1"),  # an empty synthetic dataset
    ("--config.synthetic.num_eval=0", "config.synthetic.num_eval"),
    ("--config.synthetic.seed=-3", "config.synthetic.seed"),
    ("--config.synthetic.num_train=4", "fewer than one batch (config.data.batch_size=8)"),  # batch > dataset
    ("--config.data.num_epochs=0", "config.data.num_epochs"),
]


@pytest.mark.parametrize("override,named", CONFIG_FIELDS, ids=[c[0] for c in CONFIG_FIELDS])
def test_config_fields_are_finite_and_in_range(capsys, tmp_path, override, named):
    rc, out = run_cli(capsys, "train", "--config", TINY, "--workdir", str(tmp_path / "w"), override)
    assert_user_error(rc, out, named)
    assert not (tmp_path / "w").exists()  # refused before the workdir (or any data) was made


def test_a_norm_eps_of_zero_does_make_nan():
    """Why eps = 0 is refused: the RMS norm of an all-zero row (e.g. a zero embedding) is 0/0."""
    import jax
    import jax.numpy as jnp

    from mmlm.models.layers import RMSNorm

    norm = RMSNorm(eps=0.0)
    x = jnp.zeros((1, 4))
    assert np.isnan(np.asarray(norm.apply(norm.init(jax.random.PRNGKey(0), x), x))).all()


# ---------------------------------------------------------------------------- convert: which files

def _single_file_next_to_a_stale_index(src: str) -> dict[str, np.ndarray]:
    """A sharded tiny LLaMA plus model.safetensors holding other values (the index is now stale)."""
    from convert_helpers import tiny_llama

    from mmlm.convert.io import CheckpointReader, save_safetensors

    tiny_llama(src, "llama2")
    reader = CheckpointReader(src)
    assert reader.index is not None
    newer = {n: (reader.get(n) + 1).astype(np.float32) for n in reader.names()}
    save_safetensors(os.path.join(src, "model.safetensors"), newer, {"format": "pt"})
    return newer


def test_single_file_wins_over_a_stale_index_as_in_transformers(capsys, tmp_path):
    from convert_helpers import load_mmlm
    from transformers import LlamaForCausalLM

    src, dst = str(tmp_path / "hf"), str(tmp_path / "mmlm")
    newer = _single_file_next_to_a_stale_index(src)
    ref = LlamaForCausalLM.from_pretrained(src)  # transformers' rule: the single file
    name = "model.embed_tokens.weight"
    np.testing.assert_array_equal(ref.state_dict()[name].numpy(), newer[name])
    rc, out = run_cli(capsys, "convert", "--from", "hf-llama", "--src", src, "--dst", dst, "--quiet")
    assert rc == 0, out
    assert f"read {os.path.abspath(src)}: model.safetensors;" in out
    assert "not read: model.safetensors.index.json" in out
    _, params = load_mmlm(dst)
    np.testing.assert_array_equal(np.asarray(params["llm"]["embed_tokens"]["embedding"]), newer[name])


def test_weights_with_nan_or_inf_are_named_at_convert(capsys, tmp_path):
    from convert_helpers import tiny_llama

    from mmlm.convert.io import CheckpointReader, save_safetensors

    src = str(tmp_path / "hf")
    tiny_llama(src, "llama2")
    reader = CheckpointReader(src)
    tensors = {n: reader.get(n) for n in reader.names()}
    for f in os.listdir(src):  # one single file instead of the shards
        if f.endswith((".safetensors", ".index.json")):
            os.remove(os.path.join(src, f))
    tensors["model.layers.1.mlp.up_proj.weight"][0, :3] = np.nan
    tensors["model.norm.weight"][5] = np.inf
    save_safetensors(os.path.join(src, "model.safetensors"), tensors, {"format": "pt"})
    dst = tmp_path / "mmlm"
    rc, out = run_cli(capsys, "convert", "--from", "hf-llama", "--src", src, "--dst", str(dst), "--quiet")
    assert_user_error(rc, out, "2 tensor(s)", "model.layers.1.mlp.up_proj.weight (3 of", "model.norm.weight (1 of",
                      "--allow_nonfinite")
    assert not (dst / "params").exists()
    rc, out = run_cli(capsys, "convert", "--from", "hf-llama", "--src", src, "--dst", str(dst), "--quiet",
                      "--allow_nonfinite")
    assert rc == 0 and "written with NaN/inf (--allow_nonfinite): model.layers.1.mlp.up_proj.weight" in out, out


# ---------------------------------------------------------------------- conversations cut at T

def test_cut_conversations_are_counted_at_build_and_at_train_start(capsys, tmp_path, caplog):
    pytest.importorskip("tensorflow")
    from mmlm.config_utils import load_config
    from mmlm.errors import UserError
    from mmlm.train.data import check_supervision

    # With the default (Vicuna) system prompt and the tiny tokenizer: 37 tokens for r0 and r3; r1 has 76,
    # its answer from token 35 on; r2 has 96, its answer from token 94 on.
    long_question = " ".join(["what colour is the big circle"] * 6)
    recs = [_record(0), _record(1, answer="red " * 40), _record(2, question=long_question), _record(3)]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    out = tmp_path / "ds"
    rc, text = run_cli(capsys, "data", "build", "--json", str(tmp_path / "d.json"), "--out", str(out), "--quiet",
                       "--max-text-len", "64")
    assert rc == 0, text
    assert "2 of 4 examples are longer than max_text_len=64" in text and "1 of them keep no supervised" in text
    assert "r2" in text
    split = json.loads((out / "build_report.json").read_text())["splits"]["train"]["text"]
    assert (split["checked"], split["truncated"], split["unsupervised"]) == (4, 2, 1)
    assert split["examples"] == {"truncated": ["r1"], "unsupervised": ["r2"]}

    config = load_config(TINY, ["--config.data.max_text_len=64", f"--config.data.dataset_dir={out}"])
    config.data.tokenizer, config.data.system_prompt = "", None  # the build's settings: the report is used
    with caplog.at_level("WARNING"):
        counts = check_supervision(config, "train")
    assert (counts.truncated, counts.unsupervised) == (2, 1)
    assert "keep no supervised (answer) token and train nothing (e.g. r2)" in caplog.text
    config.data.max_text_len = 128  # other settings: counted on the records themselves
    assert check_supervision(config, "train").unsupervised == 0
    config.data.max_text_len = 30  # nothing left to learn from: refused
    with pytest.raises(UserError, match="every one, so training would learn nothing"):
        check_supervision(config, "train")


# ================================================================================ tracebacks left

# -------------------------------------------------------------------------------- data build

@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_deeply_nested_json_skips_that_record(capsys, tmp_path, suffix):
    pytest.importorskip("tensorflow")
    deep = "[" * 100_000 + "]" * 100_000
    good = json.dumps(_record(0))
    bad = '{"id": "deep", "extra": ' + deep + "}"
    path = tmp_path / f"d{suffix}"
    path.write_text(f"[{good},\n{bad},\n{json.dumps(_record(2))}]" if suffix == ".json" else f"{good}\n{bad}\n")
    rc, out = run_cli(capsys, "data", "build", "--json", str(path), "--out", str(tmp_path / "o"), "--quiet")
    assert rc == 0, out[-2000:]
    report = json.loads((tmp_path / "o" / "build_report.json").read_text())
    assert report["written"] == (2 if suffix == ".json" else 1)
    assert report["skipped"] == {"malformed_record": 1}
    assert report["examples"]["malformed_record"] == ["#1" if suffix == ".json" else "line 2"]
    assert "nested too deeply" in out


def test_json_input_that_is_a_directory(capsys, tmp_path):
    rc, out = run_cli(capsys, "data", "build", "--json", str(tmp_path), "--out", str(tmp_path / "o"))
    assert_user_error(rc, out, str(tmp_path), "is a directory")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny built dataset (4 image records)."""
    pytest.importorskip("tensorflow")
    from mmlm.data.build import build_dataset

    root = tmp_path_factory.mktemp("built")
    Image.new("RGB", (16, 16), (200, 10, 10)).save(root / "x.png")
    (root / "d.json").write_text(json.dumps([_record(i, image="x.png") for i in range(4)]))
    build_dataset(str(root / "d.json"), str(root), str(root / "ds"), progress=False)
    return root


def _train_on(built_dir: Path, tmp_path: Path, *overrides: str) -> list[str]:
    return ["train", "--config", TINY, "--workdir", str(tmp_path / "w"), "--config.synthetic.kind=",
            "--config.train.vision_pretrain.steps=0", f"--config.data.dataset_dir={built_dir}",
            "--config.data.train_split=train", *overrides]


def test_batch_larger_than_the_dataset(capsys, tmp_path, built):
    rc, out = run_cli(capsys, *_train_on(built / "ds", tmp_path))
    assert_user_error(rc, out, "split 'train'", "has 4 examples, fewer than one global batch",
                      "config.data.batch_size=8")


@pytest.mark.parametrize("damage", ["not_json", "no_splits"])
def test_corrupt_dataset_manifest(capsys, tmp_path, built, damage):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(built / "ds", ds)
    (ds / "mmlm_dataset.json").write_text("{oops" if damage == "not_json" else '{"name": "x"}')
    rc, out = run_cli(capsys, "data", "inspect", str(ds), "--save-dir", "")
    assert_user_error(rc, out, str(ds / "mmlm_dataset.json"), "damaged", "--overwrite")
    rc, out = run_cli(capsys, *_train_on(ds, tmp_path, "--config.data.batch_size=2"))
    assert_user_error(rc, out, str(ds / "mmlm_dataset.json"), "damaged")


def test_ctrl_c_during_data_build_exits_130_and_leaves_nothing(tmp_path):
    """A real SIGINT while records are decoded: exit status 130, one line, no traceback, no dataset."""
    pytest.importorskip("tensorflow")
    big = np.tile(np.linspace(0, 255, 1500, dtype=np.uint8)[None, :, None], (1500, 1, 3))  # slow to decode
    Image.fromarray(big).save(tmp_path / "big.png")
    (tmp_path / "d.json").write_text(json.dumps([_record(i, image="big.png") for i in range(3000)]))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "mmlm.cli", "data", "build", "--json", str(tmp_path / "d.json"),
               "--images", str(tmp_path), "--out", str(tmp_path / "out"), "--workers", "1"]
    # Started as from a terminal, with SIGINT at its default action. A test run started in the background of a
    # non-interactive shell (`pytest ... &`) ignores SIGINT, and a command inherits that: Python then installs
    # no KeyboardInterrupt handler and the build rightly runs on (the cause of this test's earlier failures).
    with_default_sigint = ["import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                           "os.execv(sys.executable, sys.argv[1:])", *command]
    proc = subprocess.Popen([sys.executable, "-c", *with_default_sigint], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    out = tmp_path / "out"
    chunks: list[str] = []  # stderr as it comes (a thread reads it, so the pipe never fills)
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read(256), "")), daemon=True)
    reader.start()

    def started() -> bool:
        # The build's progress bar has counted a decoded record: TFDS is taking records. (TFDS may make its
        # dataset directory only once it writes, near the end on a loaded machine: too late to interrupt.)
        return re.search(r"build train:.*\| [1-9]\d*/\d+", "".join(chunks)) is not None

    deadline = time.time() + 240
    while not started() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert started(), "the build never started taking records: " + "".join(chunks)[-3000:]
    time.sleep(1.0)
    assert proc.poll() is None, "".join(chunks)[-3000:]
    # The child's signal masks (pending, blocked, ignored, caught), for a failure's message.
    status = Path(f"/proc/{proc.pid}/status")  # Linux
    masks = [line.strip() for line in (status.read_text().splitlines() if status.exists() else [])
             if line.startswith(("SigPnd", "SigBlk", "SigIgn", "SigCgt"))]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(30)
    err = "".join(chunks)
    assert proc.returncode == 130, f"{masks}\n{err[-3000:]}"
    assert "Traceback" not in err and "mmlm data build: interrupted" in err, err[-3000:]
    assert not (out / "llava_data").exists() and not (out / "mmlm_dataset.json").exists()


# ------------------------------------------------------------------------------ workdirs, chat, eval

@pytest.mark.parametrize("command", ["chat", "eval"])
@pytest.mark.parametrize("source", ["--checkpoint", "--workdir"])
def test_damaged_config_json(capsys, tmp_path, model, command, source):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(model / "ckpt", ck)
    (ck / "config.json").write_text('{"model": {"vision": ')
    tail = (["--image", str(model / "img.png"), "--prompt", "q"] if command == "chat" else
            ["--data", str(model / "q.jsonl"), "--out", str(tmp_path / "o")])
    rc, out = run_cli(capsys, command, source, str(ck), *tail)
    assert_user_error(rc, out, str(ck / "config.json"), "damaged")
    (ck / "config.json").write_text("[1, 2]")
    rc, out = run_cli(capsys, command, source, str(ck), *tail)
    assert_user_error(rc, out, str(ck / "config.json"), "'model' section")


def test_a_hand_edited_config_json_is_checked_like_a_config(capsys, tmp_path, model):
    """chat / eval refuse a saved model config the trainer would refuse (here a norm eps of 0: NaN answers)."""
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(model / "ckpt", ck)
    saved = json.loads((ck / "config.json").read_text())
    saved["model"]["llm"]["rms_eps"] = 0.0
    (ck / "config.json").write_text(json.dumps(saved))
    rc, out = run_cli(capsys, "eval", "--checkpoint", str(ck), "--data", str(model / "q.jsonl"),
                      "--out", str(tmp_path / "o"))
    assert_user_error(rc, out, str(ck / "config.json"), "config.model.llm.rms_eps must be > 0")


@pytest.mark.parametrize("kind", ["corrupt_model", "corrupt_json", "missing"])
def test_missing_or_corrupt_tokenizer(capsys, tmp_path, model, kind):
    path = tmp_path / {"corrupt_model": "tok.model", "corrupt_json": "tokenizer.json", "missing": "no.model"}[kind]
    if kind != "missing":
        path.write_bytes(b"\x00garbage{")
    rc, out = run_cli(capsys, "chat", "--checkpoint", str(model / "ckpt"), "--image", str(model / "img.png"),
                      "--prompt", "q", "--tokenizer", str(path))
    assert_user_error(rc, out, str(path), "does not exist" if kind == "missing" else "damaged")
    rc, out = run_cli(capsys, "train", "--config", TINY, "--workdir", str(tmp_path / "w"),
                      f"--config.data.tokenizer={path}", "--config.synthetic.num_train=8",
                      "--config.synthetic.num_eval=8", "--config.train.vision_pretrain.steps=0")
    assert_user_error(rc, out, str(path))


def test_image_marker_typed_into_a_chat_turn_keeps_the_session(capsys, model):
    import sys as _sys

    from mmlm.cli.common import run_command
    from mmlm.cli import chat

    args = chat.build_parser().parse_args(["--checkpoint", str(model / "ckpt"), "--image", str(model / "img.png"),
                                      "--max_new_tokens", "2"])
    stdin = io.TextIOWrapper(io.BytesIO(b"what is it?\nis <image> red?\n<image> <video>\nand now?\n"),
                             encoding="utf-8")
    answers: list[str] = []
    real = chat.answer

    def recording(*a, **k):
        answers.append(a[2])
        return real(*a, **k)

    chat.answer = recording
    try:
        rc = run_command("chat", lambda a: chat.run(a, stdin=stdin, out=_sys.stdout, err=_sys.stderr), args)
    finally:
        chat.answer = real
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert answers == ["what is it?", "and now?"]  # the marker turns were refused, the chat went on
    assert out.err.count("in a follow-up question") == 2 and "Traceback" not in out.err


def test_image_marker_in_a_single_prompt_is_one_line(capsys, model):
    rc, out = run_cli(capsys, "chat", "--checkpoint", str(model / "ckpt"), "--image", str(model / "img.png"),
                      "--prompt", "<image> and <image>?", "--max_new_tokens", "2")
    assert_user_error(rc, out, "2 <image>/<video> markers")


def test_ctrl_c_during_eval_exits_130(capsys, tmp_path, model, monkeypatch):
    """Ctrl-C (KeyboardInterrupt in the main thread) while answering: status 130, one line, answers kept."""
    from mmlm.infer import generate as gen

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "generate", interrupted)
    rc, out = run_cli(capsys, "eval", "--checkpoint", str(model / "ckpt"), "--data", str(model / "q.jsonl"),
                      "--out", str(tmp_path / "o"), "--no_progress")
    assert rc == 130 and "mmlm eval: interrupted" in out and "Traceback" not in out, out


def test_json_output_that_is_a_directory(capsys, tmp_path):
    rc, out = run_cli(capsys, "bench", "video-memory", "--config", TINY, "--json", str(tmp_path))
    assert_user_error(rc, out, "--json", str(tmp_path), "is a directory")
    rc, out = run_cli(capsys, "bench", "video-memory", "--config", TINY, "--json", str(tmp_path / "no" / "x.json"))
    assert_user_error(rc, out, "does not exist")


# ------------------------------------------------------------------------------------ full disk

def _enospc(path: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@pytest.mark.parametrize("when", ["save", "async"])
def test_full_disk_during_a_checkpoint_save(tmp_path, when):
    """The save fails on a full disk (at once, or in Orbax's background thread, which re-raises it wrapped):
    one `DiskFullError` naming the directory and the free space, the partial step removed, close() quiet."""
    from mmlm.errors import DiskFullError
    from mmlm.train.checkpointing import TMP_MARKER, Checkpointer

    ckpt = Checkpointer(str(tmp_path))
    partial = Path(ckpt.root) / f"5{TMP_MARKER}-1700000000"

    def failing_save(step, args=None, force=False):
        partial.mkdir(parents=True)
        (partial / "half").write_bytes(b"x" * 100)
        if when == "save":
            raise _enospc(str(partial / "half"))

    def failing_wait():
        if partial.exists():
            try:
                raise _enospc(str(partial / "half"))
            except OSError as e:  # how a background writer reports it: another type, the OS error as cause
                raise RuntimeError("checkpoint write failed") from e

    ckpt.manager.save = failing_save
    ckpt.manager.wait_until_finished = failing_wait
    state = {"params": {"w": np.zeros(2)}, "opt_state": {}, "step": 5, "rng": np.zeros(2, np.uint32)}
    with pytest.raises(DiskFullError) as e:
        ckpt.save(5, state)
        ckpt.save(6, state)  # "async": the first save's failure surfaces when the next one waits for it
    msg = str(e.value)
    assert ckpt.root in msg and "MiB free" in msg and "no space left" in msg and "\n" not in msg
    assert not partial.exists()
    ckpt.close()  # the failure was reported once; closing does not raise it again


def test_full_disk_anywhere_in_a_command_is_one_line(capsys, tmp_path):
    from mmlm.cli.common import run_command

    def writes(_):
        raise _enospc(str(tmp_path / "out.json"))

    assert run_command("x", writes, None) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmlm x: error: no space left on the device writing '{tmp_path / 'out.json'}'")
    assert "MiB free there" in err and err.count("\n") == 1


def test_full_disk_while_writing_data_is_one_line(capsys, tmp_path, monkeypatch):
    from mmlm.data import synth

    def full(*args, **kwargs):
        raise _enospc(str(tmp_path / "o" / "images" / "0.png"))

    monkeypatch.setattr(synth, "synthesize", full)
    rc, out = run_cli(capsys, "data", "synth", "--kind", "shapes", "--out", str(tmp_path / "o"), "--num", "2")
    assert_user_error(rc, out, "no space left on the device writing", "0.png", "MiB free there")
