"""`mmlm data synth|build|inspect|tokenizer` and `mmlm bench data` end to end."""

from __future__ import annotations

import json

import ml_collections
import pytest

from mmlm import cli as mmlm_cli
from mmlm.cli import bench_data
from mmlm.cli import data as cli
from mmlm.data.config import default_data_config
from mmlm.data.pipeline import make_dataset


@pytest.fixture(scope="module")
def data_cli_dataset(tmp_path_factory):
    """shapes_hd made by `mmlm data synth` and built by `mmlm data build`."""
    root = tmp_path_factory.mktemp("cli")
    raw, ds = root / "raw", root / "ds"
    for split, n in (("train", 16), ("val", 5)):
        assert mmlm_cli.main(["data", "synth", "--kind", "shapes_hd", "--out", str(raw), "--num", str(n),
                              "--seed", "1", "--split", split, "--image-size", "64"]) == 0
    assert cli.main(["build", "--json", f"train={raw / 'train.json'}", "--json", f"val={raw / 'val.json'}",
                     "--images", str(raw), "--out", str(ds), "--name", "hd", "--quiet"]) == 0
    return root


def test_synth_build_then_stream_through_grain(data_cli_dataset):
    ds = data_cli_dataset / "ds"
    report = json.loads((ds / "build_report.json").read_text())
    assert report["written"] == 21 and report["skipped"] == {} and report["examples"] == {}
    config = ml_collections.ConfigDict()
    config.data = default_data_config()
    config.data.update(dict(dataset_dir=str(ds), batch_size=4, max_text_len=40, image_size=16, hd_grid=2))
    pipe = make_dataset(config, "train", process_index=0, process_count=1, train=True)
    it = iter(pipe)
    seen = set()
    for _ in range(4):
        batch = next(it)
        assert batch["images"].shape == (4, 1, 5, 16, 16, 3)
        seen |= set(batch["example_id"].tolist())
    assert seen == set(range(16))


def test_inspect_prints_supervised_spans_and_saves_images(data_cli_dataset, tmp_path, capsys):
    save = tmp_path / "sheets"
    assert cli.main(["inspect", str(data_cli_dataset / "ds"), "--split", "val", "--num", "2",
                     "--image-size", "16", "--hd-grid", "2", "--save-dir", str(save)]) == 0
    out = capsys.readouterr().out
    records = json.loads((data_cli_dataset / "raw/val.json").read_text())
    for rec in records[:2]:
        question = rec["conversations"][0]["value"].split("\n", 1)[1]
        assert f"USER:<image> {question} ASSISTANT:[[ {rec['conversations'][1]['value']}</s>]]" in out
    assert "2 examples shown, 0 truncated" in out
    from PIL import Image

    with Image.open(save / "val_000000.png") as sheet:
        assert sheet.size == (5 * 16 + 4 * 2, 16)  # one frame, 5 views
    # Earlier sheets are replaced only with --overwrite (refused before anything is shown).
    sheet_bytes = (save / "val_000000.png").read_bytes()
    args = ["inspect", str(data_cli_dataset / "ds"), "--split", "val", "--num", "2", "--image-size", "16",
            "--hd-grid", "2", "--save-dir", str(save)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "val_000000.png" in err and "--overwrite" in err and "Traceback" not in err
    assert (save / "val_000000.png").read_bytes() == sheet_bytes
    assert cli.main(args + ["--overwrite"]) == 0


def test_contact_sheet_shows_uint8_and_normalised_images_alike():
    """`data inspect` draws uint8 pixels (data.pixels_on_device) as they are and float images denormalised."""
    import numpy as np

    from mmlm.data import preprocess
    from mmlm.data.inspect_data import contact_sheet

    pixels = np.random.default_rng(0).integers(0, 256, (3, 2, 8, 8, 3), dtype=np.uint8)  # F=3, K=2
    mask = np.array([True, True, False])
    mean, std = preprocess.CLIP_MEAN, preprocess.CLIP_STD
    raw = np.asarray(contact_sheet(pixels, mask, mean, std))
    host = np.asarray(contact_sheet(preprocess.normalize(pixels, mean, std), mask, mean, std))
    assert raw.shape == (2 * 8 + 2, 2 * 8 + 2, 3)  # rows = the 2 real frames, columns = views
    np.testing.assert_array_equal(raw, host)
    np.testing.assert_array_equal(raw[10:18, :8], pixels[1, 0])


def test_cli_errors_name_the_bad_value(data_cli_dataset, tmp_path, capsys):
    assert cli.main(["build", "--json", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "mmlm data build" in capsys.readouterr().err
    assert cli.main(["inspect", str(data_cli_dataset / "ds"), "--split", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["synth", "--kind", "shapes", "--out", str(tmp_path), "--num", "zero"])
    assert "'zero'" in capsys.readouterr().err
    assert cli.main(["synth", "--kind", "shapes", "--out", str(tmp_path / "w"), "--num", "2",
                     "--category-weights", "colour=2"]) == 2
    assert "'colour'" in capsys.readouterr().err
    assert cli.main([]) == 0 and "synth" in capsys.readouterr().out


def test_tokenizer_command_is_deterministic(tmp_path, capsys):
    from mmlm.data.tokenizer import TINY_TOKENIZER_PATH

    out = tmp_path / "tok.model"
    assert cli.main(["tokenizer", "--out", str(out)]) == 0
    assert out.read_bytes() == TINY_TOKENIZER_PATH.read_bytes()
    # An existing tokenizer (by default the shipped one) is replaced only with --overwrite.
    out.write_bytes(b"earlier")
    assert cli.main(["tokenizer", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"earlier"
    assert cli.main(["tokenizer", "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() == TINY_TOKENIZER_PATH.read_bytes()


def test_bench_data(data_cli_dataset, capsys):
    assert mmlm_cli.main(["bench", "data", "--dataset", str(data_cli_dataset / "ds"), "--batch-size", "4",
                          "--batches", "2", "--warmup", "1", "--image-size", "16", "--max-text-len", "40",
                          "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["examples_per_s"] > 0 and result["images_shape"] == [4, 1, 1, 16, 16, 3]
    with pytest.raises(SystemExit) as e:  # refused by the flag's type: usage and one error line
        bench_data.main(["--batches", "0"])
    assert e.value.code == 2
    assert "--batches: expected an integer >= 1, got '0'" in capsys.readouterr().err
