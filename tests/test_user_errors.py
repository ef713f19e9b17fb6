"""Every class of user mistake: exit status 2, one message naming the key / file / value, no traceback.

The command mains run in-process (`mmlm.cli.main`); every case fails before
any data is built or anything is compiled, so each takes well under a second
(the first one pays for the imports).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmlm.cli import main as mmlm_main
from model_helpers import tiny_checkpoint_and_image

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = mmlm_main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def assert_user_error(rc: int, out: str, *named: str) -> None:
    assert rc == 2, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    for text in named:
        assert text in out, f"{text!r} not in:\n{out[-2000:]}"


# ------------------------------------------------------------------- config overrides and values

CONFIG_MISTAKES = [
    # (override, text the message must name)
    ("--config.train.stepz=5", "train.stepz"),
    ("--config.trian.steps=5", "trian"),
    ("--config.train.steps=abc", "config.train.steps"),
    ("--config.train.steps=2.5", "config.train.steps"),
    ("--config.model.llm.width=64.5", "config.model.llm.width"),
    ("--config.model.llm.width='wide'", "config.model.llm.width"),
    ("--config.train.progress_bar=maybe", "config.train.progress_bar"),
    ("--config.model=3", "config.model"),
    ("--config.data.batch_size=0", "config.data.batch_size"),
    ("--config.data.batch_size=-8", "config.data.batch_size"),
    ("--config.train.steps=0", "config.train.steps"),
    ("--config.train.steps=-5", "config.train.steps"),
    ("--config.train.grad_accum_steps=3", "config.train.grad_accum_steps"),
    ("--config.mesh.fsdp=0", "config.mesh.fsdp"),
    ("--config.mesh.tensor=-2", "config.mesh.tensor"),
    ("--config.mesh.fsdp=3", "config.mesh"),
    ("--config.model.vision.heads=3", "config.model.vision.heads"),
    ("--config.model.compressor.heads=5", "config.model.compressor.heads"),
    ("--config.model.llm.heads=3", "kv_heads"),
    ("--config.optim.learning_rate.llm=-1e-3", "config.optim.learning_rate.llm"),
    ("--config.optim.schedule=cosin", "config.optim.schedule"),
    ("--config.optim.warmup_ratio=1.5", "config.optim.warmup_ratio"),
    ("--config.train.trainable=('llm','vison')", "vison"),
    ("--config.eval.max_new_tokens=0", "config.eval.max_new_tokens"),
    ("--config.data.template=vicuna", "config.data.template"),
    ("--config.model.compressor.budgets=(1,9)", "budget 9"),
    ("--config.data.frame_buckets=(0,8)", "data.frame_buckets"),
    ("--config.data.length_buckets=(16.5,)", "data.length_buckets"),
    ("--config.data.pixels_on_device=maybe", "config.data.pixels_on_device"),
    ("--config.model.image_std=(0.2,0,0.3)", "model.image_std"),
    ("--config.data.image_mean=(0.5,0.5)", "image_mean"),
    ("--config.train.vision_pretrain.steps=-1", "config.train.vision_pretrain.steps"),
    ("--config.train.vision_pretrain.batch_size=0", "config.train.vision_pretrain.batch_size"),
    ("--config.train.vision_pretrain.learning_rate=0.0", "config.train.vision_pretrain.learning_rate"),
]


@pytest.mark.parametrize("override,named", CONFIG_MISTAKES, ids=[c[0] for c in CONFIG_MISTAKES])
def test_train_config_mistakes(capsys, tmp_path, override, named):
    rc, out = run_cli(capsys, "train", "--config", TINY, "--workdir", str(tmp_path / "w"), override)
    assert_user_error(rc, out, named)
    assert not (tmp_path / "w" / "data").exists()  # refused before any data was built


SUMMARY_MISTAKES = [c for c in CONFIG_MISTAKES if c[0].split("=")[0].split(".")[1] in ("model", "train", "optim",
                                                                                     "data", "eval", "trian")]


@pytest.mark.parametrize("override,named", SUMMARY_MISTAKES, ids=[c[0] for c in SUMMARY_MISTAKES])
def test_summary_config_mistakes(capsys, override, named):
    rc, out = run_cli(capsys, "summary", "--config", TINY, override)
    assert_user_error(rc, out, named)


def test_data_normalisation_follows_the_model_or_is_refused():
    """data.image_mean / image_std are the model's (one override sets both); a config whose two copies differ
    (e.g. a hand-edited config.json) is refused by the validator."""
    import ml_collections

    from mmlm.config_utils import ConfigError, load_config
    from mmlm.train.config import validate_config

    config = load_config(TINY, ["--config.data.image_std=(0.5,0.5,0.5)"])
    assert config.model.image_std == config.data.image_std == (0.5, 0.5, 0.5)
    config = load_config(TINY, ["--config.model.image_mean=(0.5,0.4,0.3)"])
    assert config.data.image_mean == (0.5, 0.4, 0.3)
    validate_config(config)
    plain = ml_collections.ConfigDict(config.to_dict())  # no references, as loaded from JSON
    plain.data.image_mean = (0.1, 0.2, 0.3)
    with pytest.raises(ConfigError, match=r"config.data.image_mean=\(0.1, 0.2, 0.3\) differs from config.model"):
        validate_config(plain)


def test_overrides_keep_the_field_type():
    from mmlm.config_utils import ConfigError, load_config

    config = load_config(TINY, ["--config.train.steps=7.0", "--config.optim.learning_rate.llm=1",
                                "--config.model.compressor.budgets=4"])
    assert config.train.steps == 7 and type(config.train.steps) is int
    assert config.optim.learning_rate.llm == 1.0 and type(config.optim.learning_rate.llm) is float
    assert config.model.compressor.budgets == (4,)
    with pytest.raises(ConfigError, match="fractional"):
        load_config(TINY, ["--config.train.steps=2.5"])


# --------------------------------------------------------------------------------- config files

def _config_files(root: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, text the message must contain)."""
    files = {
        "syntax_error": ("def get_config(:\n", "syntax error at line 1"),
        "raises": ("def get_config():\n    raise RuntimeError('boom')\n", "boom"),
        "raises_on_import": ("import no_such_module_here\n", "no_such_module_here"),
        "no_get_config": ("x = 1\n", "no get_config()"),
        "returns_none": ("def get_config():\n    return None\n", "returned NoneType"),
    }
    out = {}
    for name, (text, named) in files.items():
        (root / f"{name}.py").write_text(text)
        out[name] = (str(root / f"{name}.py"), named)
    out["missing"] = (str(root / "missing.py"), "does not exist")
    out["directory"] = (str(root), "is not a file")
    return out


@pytest.mark.parametrize("command", ["train", "summary"])
@pytest.mark.parametrize("kind", ["syntax_error", "raises", "raises_on_import", "no_get_config", "returns_none",
                                  "missing", "directory"])
def test_config_file_mistakes(capsys, tmp_path, command, kind):
    path, named = _config_files(tmp_path)[kind]
    extra = ["--workdir", str(tmp_path / "w")] if command == "train" else []
    rc, out = run_cli(capsys, command, "--config", path, *extra)
    assert_user_error(rc, out, path, named)


# ------------------------------------------------------------------------------------ workdirs

def test_unusable_workdir(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    for workdir in (tmp_path / "file", tmp_path / "file" / "sub"):
        rc, out = run_cli(capsys, "train", "--config", TINY, "--workdir", str(workdir))
        assert_user_error(rc, out, str(workdir))


def test_init_from_that_is_not_a_model_checkpoint(capsys, tmp_path):
    rc, out = run_cli(capsys, "train", "--config", TINY, "--workdir", str(tmp_path / "w"),
                      "--init_from", str(tmp_path / "nope"))
    assert_user_error(rc, out, "--init_from", str(tmp_path / "nope"))
    assert not (tmp_path / "w" / "data").exists()


def _fake_trained_workdir(root: Path, *overrides: str) -> Path:
    """A workdir as a run with `overrides` leaves it: config.json and a checkpoint step directory."""
    from mmlm.checkpoint import save_config
    from mmlm.config_utils import load_config

    work = root / "trained"
    save_config(str(work), load_config(TINY, list(overrides)))
    (work / "checkpoints" / "5").mkdir(parents=True)
    return work


def test_resuming_with_another_model_config_is_refused_and_keeps_config_json(capsys, tmp_path):
    work = _fake_trained_workdir(tmp_path)
    before = (work / "config.json").read_bytes()
    rc, out = run_cli(capsys, "train", "--config", TINY, "--workdir", str(work),
                      "--config.model.llm.width=64", "--config.model.llm.layers=3")
    assert_user_error(rc, out, "model.llm.width=32, the config says 64", "model.llm.layers=2, the config says 3",
                      "new --workdir")
    assert (work / "config.json").read_bytes() == before  # chat / eval still load the workdir
    assert not (work / "data").exists()


def test_resuming_with_other_training_settings_is_allowed(tmp_path):
    from mmlm.config_utils import load_config
    from mmlm.train.checkpointing import check_saved_model_config

    work = _fake_trained_workdir(tmp_path)
    check_saved_model_config(load_config(TINY, ["--config.train.steps=50", "--config.model.remat_policy=full",
                                                "--config.model.loss_positions=8",
                                                "--config.optim.learning_rate.llm=5e-4"]), str(work))


def test_loss_positions_fewer_than_a_rows_answer_tokens(capsys, tmp_path):
    """The LM head limited below a row's answer tokens stops training (nothing is dropped silently)."""
    rc, out = run_cli(capsys, "train", "--config", TINY, "--workdir", str(tmp_path / "w"),
                      "--config.model.loss_positions=1")
    assert_user_error(rc, out, "model.loss_positions=1", "no checkpoint was saved yet",
                      "--config.model.loss_positions=")


def test_stale_tmp_checkpoint_dirs_are_removed(tmp_path):
    from mmlm.train.checkpointing import Checkpointer

    stale = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1700000000"
    stale.mkdir(parents=True)
    (stale / "partial").write_bytes(b"x")
    ckpt = Checkpointer(str(tmp_path))
    ckpt.close()
    assert not stale.exists()


# ---------------------------------------------------------------------------------------- chat

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random model checkpoint and a test image."""
    return tiny_checkpoint_and_image(tmp_path_factory.mktemp("chat_errors"))


def _chat(capsys, model, *argv: str, stdin: bytes | None = None) -> tuple[int, str]:
    if stdin is None:
        return run_cli(capsys, "chat", "--checkpoint", str(model / "ckpt"), *argv)
    import io
    import sys

    from mmlm.cli.common import run_command
    from mmlm.cli import chat

    args = chat.build_parser().parse_args(["--checkpoint", str(model / "ckpt"), *argv])
    wrapper = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    rc = run_command("chat", lambda a: chat.run(a, stdin=wrapper, out=sys.stdout, err=sys.stderr), args)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_chat_decompression_bomb(capsys, model, monkeypatch):
    Image.new("L", (64, 64)).save(model / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # a "bomb" for this limit, without 10 GB
    rc, out = _chat(capsys, model, "--image", str(model / "bomb.png"), "--prompt", "q")
    assert_user_error(rc, out, str(model / "bomb.png"), "too large")


@pytest.mark.parametrize("kind", ["directory", "not_an_image"])
def test_chat_bad_image_path_is_named(capsys, model, kind):
    path = model / "a_dir" if kind == "directory" else model / "notes.png"
    if kind == "directory":
        path.mkdir(exist_ok=True)
    else:
        path.write_text("plain text")
    rc, out = _chat(capsys, model, "--image", str(path), "--prompt", "q")
    assert_user_error(rc, out, str(path), "is a directory" if kind == "directory" else "cannot identify the image format")
    assert "BytesIO" not in out


def test_chat_non_utf8_prompt_and_stdin(capsys, model):
    bad = b"caf\xe9?".decode("utf-8", "surrogateescape")  # how Python passes non-UTF-8 argv bytes
    rc, out = _chat(capsys, model, "--image", str(model / "img.png"), "--prompt", bad)
    assert_user_error(rc, out, "--prompt", "UTF-8")
    rc, out = _chat(capsys, model, "--image", str(model / "img.png"), stdin=b"caf\xe9?\n")
    assert_user_error(rc, out, "stdin", "UTF-8")


def test_chat_prompt_longer_than_the_text_length(capsys, model):
    rc, out = _chat(capsys, model, "--image", str(model / "img.png"), "--prompt", "what " * 200,
                    "--max_new_tokens", "2")
    assert_user_error(rc, out, "more than the model's text length of 32 tokens", "data.max_text_len")


def test_step_with_a_model_checkpoint_is_refused(capsys, model):
    """A model checkpoint holds one set of weights: --step there is a mistake, not something to ignore."""
    rc, out = _chat(capsys, model, "--step", "3", "--image", str(model / "img.png"), "--prompt", "q")
    assert_user_error(rc, out, "--step 3", "--checkpoint", "--workdir")


@pytest.mark.parametrize("kind", ["missing_dir", "not_a_dir", "is_a_dir"])
def test_chat_compression_map_destination(capsys, model, kind):
    (model / "afile").write_text("x")
    dest = {"missing_dir": model / "nope" / "map.png", "not_a_dir": model / "afile" / "map.png",
            "is_a_dir": model}[kind]
    rc, out = _chat(capsys, model, "--image", str(model / "img.png"), "--prompt", "q",
                    "--save_compression_map", str(dest))
    assert_user_error(rc, out, "--save_compression_map", str(dest))


# ---------------------------------------------------------------------------------------- data

def test_data_build_reports_an_image_path_that_is_a_directory(capsys, tmp_path):
    pytest.importorskip("tensorflow")
    images = tmp_path / "images"
    (images / "folder.png").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / "ok.png")
    rec = lambda i, img: {"id": str(i), "image": img, "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    (tmp_path / "d.json").write_text(json.dumps([rec(0, "ok.png"), rec(1, "folder.png")]))
    rc, out = run_cli(capsys, "data", "build", "--json", str(tmp_path / "d.json"), "--images", str(images),
                      "--out", str(tmp_path / "out"), "--quiet")
    assert rc == 0, out
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["skipped"] == {"undecodable_image": 1}  # not "missing_file": the path exists


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py")))
def test_every_shipped_config_passes_validation(path):
    """Each config in configs/ is valid as shipped, on one device (so new config keys reach the validator)."""
    from mmlm.config_utils import load_config
    from mmlm.train.config import validate_config

    validate_config(load_config(path), num_devices=1)
