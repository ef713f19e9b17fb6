"""`mmlm data build`: every bad-record reason is skipped and reported, never fatal."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from mmlm.data import build, synth
from mmlm.data.pipeline import open_split, record_ids


def _png(color=(200, 30, 30), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _turns(question="<image>\nWhat color?", answer="red"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def data_bad_records(tmp_path_factory):
    """A media tree and a JSON (+ JSONL) mixing good records with one of each bad kind."""
    root = tmp_path_factory.mktemp("bad")
    images, videos, outside = root / "images", root / "videos", root / "outside"
    for d in (images, videos, outside):
        d.mkdir()
    (images / "ok.png").write_bytes(_png())
    (images / "garbage.png").write_bytes(b"this is not a png")
    (images / "truncated.png").write_bytes(_png(size=(64, 64))[:60])
    (outside / "secret.png").write_bytes(_png())
    os.symlink(outside / "secret.png", images / "link.png")
    synth.encode_video([np.full((32, 32, 3), 40 * k, np.uint8) for k in range(6)], 2, videos / "ok.mp4")
    (videos / "garbage.mp4").write_bytes(b"\x00\x01" * 64)
    records = [
        {"id": "good_image", "image": "ok.png", "conversations": _turns()},
        {"id": "good_video", "video": "ok.mp4", "conversations": _turns("<video>\nWhat happens?", "red")},
        {"id": "good_text", "conversations": _turns("How many?", "two")},
        {"id": "good_image_in_list", "image": ["ok.png"], "conversations": _turns()},
        {"id": "missing", "image": "nope.png", "conversations": _turns()},
        {"id": "garbage_png", "image": "garbage.png", "conversations": _turns()},
        {"id": "truncated_png", "image": "truncated.png", "conversations": _turns()},
        {"id": "garbage_mp4", "video": "garbage.mp4", "conversations": _turns()},
        {"id": "only_human", "image": "ok.png", "conversations": _turns()[:1]},
        {"id": "no_marker", "image": "ok.png", "conversations": _turns("What color?")},
        {"id": "marker_no_media", "conversations": _turns()},
        {"id": "two_markers", "image": "ok.png", "conversations": _turns("<image> <image> What?")},
        {"id": "marker_late", "image": "ok.png", "conversations": _turns("What?") + _turns("<image> Now?")},
        {"id": "video_marker_on_image", "image": "ok.png", "conversations": _turns("<video>\nWhat?")},
        {"id": "dotdot", "image": "../outside/secret.png", "conversations": _turns()},
        {"id": "absolute", "image": str(outside / "secret.png"), "conversations": _turns()},
        {"id": "symlink_out", "image": "link.png", "conversations": _turns()},
        {"id": "surrogate", "image": "ok.png", "conversations": _turns("<image>\nWhat \ud800?")},
        {"id": "bad_turns", "image": "ok.png", "conversations": "not a list"},
        {"id": "bad_role", "image": "ok.png", "conversations": [{"from": "robot", "value": "<image>"}]},
        "not an object",
    ]
    (root / "train.json").write_text(json.dumps(records), encoding="utf-8")
    # JSONL with a raw invalid UTF-8 byte in one record and a line that is not JSON.
    lines = [json.dumps({"id": "jl_good", "image": "ok.png", "conversations": _turns()}).encode(),
             json.dumps({"id": "jl_bad_bytes", "image": "ok.png",
                         "conversations": _turns("<image>\nWhat XX?")}).encode().replace(b"XX", b"\xff\xfe"),
             b"{not json",
             json.dumps({"id": "jl_video_no_dir", "video": "ok.mp4", "conversations": _turns()}).encode()]
    (root / "extra.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


EXPECTED = {
    "malformed_record": ["bad_turns", "bad_role", "#20"],
    "non_utf8_text": ["surrogate"],
    "no_assistant_turn": ["only_human"],
    "image_marker_mismatch": ["no_marker", "marker_no_media", "two_markers", "marker_late",
                              "video_marker_on_image"],
    "path_escapes_root": ["dotdot", "absolute", "symlink_out"],
    "missing_file": ["missing"],
    "undecodable_image": ["garbage_png", "truncated_png"],
    "undecodable_video": ["garbage_mp4"],
}


def test_every_bad_record_is_skipped_and_reported(data_bad_records, tmp_path):
    root = data_bad_records
    out = tmp_path / "ds"
    report = build.build_dataset({"train": root / "train.json"}, root / "images", out,
                                 videos_dir=root / "videos", name="bad", progress=False, workers=2)
    on_disk = json.loads((out / build.REPORT_FILE).read_text())
    summary = report.pop("_summary")
    assert on_disk == report
    assert report["written"] == 4
    assert report["skipped"] == {r: len(ids) for r, ids in EXPECTED.items()}
    assert report["examples"] == EXPECTED
    assert list(report["skipped"]) == list(build.REASONS)  # reported in a fixed order
    for reason in EXPECTED:
        assert reason in summary
    # The good records are stored in JSON order with their source index.
    assert record_ids(out, "train") == {0: "good_image", 1: "good_video", 2: "good_text", 3: "good_image_in_list"}
    src = open_split(out, "train")
    assert [int(src[i]["media"]) for i in range(4)] == [1, 2, 0, 1]
    assert src[0]["image"] == (root / "images/ok.png").read_bytes()  # original bytes
    assert len(src[1]["frames"]) == 3 and list(src[1]["frame_times"]) == [0.5, 1.5, 2.5]
    conv = json.loads(src[1]["conversations"])
    assert conv[0]["value"] == "<image>\nWhat happens?"  # <video> normalised to <image>
    meta = build.read_meta(out)
    assert meta["splits"]["train"]["media"] == {"none": 1, "image": 2, "video": 1}


def test_jsonl_non_utf8_bytes_and_missing_video_root(data_bad_records, tmp_path):
    root = data_bad_records
    report = build.build_dataset({"extra": root / "extra.jsonl"}, root / "images", tmp_path / "ds",
                                 name="extra", progress=False)
    assert report["written"] == 1
    assert report["examples"] == {"malformed_record": ["line 3"], "non_utf8_text": ["jl_bad_bytes"],
                                  "missing_file": ["jl_video_no_dir"]}


def test_resolve_media_refuses_traversal(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "x.png").write_bytes(b"x")
    assert build.resolve_media(root, "sub/../a.png") == (root / "a.png").resolve()
    for rel in ("../x.png", "sub/../../x.png", str(tmp_path / "x.png"), "/etc/passwd"):
        assert build.resolve_media(root, rel) is None, rel
    os.symlink(tmp_path, root / "up")
    assert build.resolve_media(root, "up/x.png") is None


def test_build_errors(data_bad_records, tmp_path):
    root = data_bad_records
    with pytest.raises(build.BuildError, match="does not exist"):
        build.build_dataset({"train": root / "nope.json"}, root / "images", tmp_path / "a", progress=False)
    with pytest.raises(build.BuildError, match="invalid dataset name"):
        build.build_dataset({"train": root / "train.json"}, root / "images", tmp_path / "a", name="Bad-Name")
    with pytest.raises(build.BuildError, match="--images directory"):
        build.build_dataset({"train": root / "train.json"}, root / "nowhere", tmp_path / "a")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(build.BuildError, match="not valid JSON"):
        build.build_dataset({"train": tmp_path / "broken.json"}, None, tmp_path / "a", progress=False)
    only_bad = tmp_path / "only_bad.json"
    only_bad.write_text(json.dumps([{"id": "x", "conversations": []}]))
    with pytest.raises(build.BuildError, match="no valid record"):
        build.build_dataset({"train": only_bad}, None, tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()  # a failed build leaves no empty output behind
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(build.BuildError, match="holds no records"):
        build.build_dataset({"train": tmp_path / "empty.json"}, None, tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists()
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"id": "t", "conversations": _turns("Hi?", "yes")}]))
    build.build_dataset({"train": good}, None, tmp_path / "c", name="c", progress=False)
    with pytest.raises(build.BuildError, match="--overwrite"):
        build.build_dataset({"train": good}, None, tmp_path / "c", name="c", progress=False)
    report = build.build_dataset({"train": good}, None, tmp_path / "c", name="c", overwrite=True, progress=False)
    assert report["written"] == 1


def test_parse_json_args(tmp_path):
    f = tmp_path / "a.json"
    f.write_text("[]")
    assert build.parse_json_args([str(f)]) == {"train": str(f)}
    assert build.parse_json_args(["val=x.json", "train=y.json"]) == {"val": "x.json", "train": "y.json"}
    with pytest.raises(build.BuildError, match="twice"):
        build.parse_json_args([str(f), str(f)])
