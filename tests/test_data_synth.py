"""Synthetic datasets: determinism, file formats, and answers that match the scenes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mmlm.data import preprocess, synth
from mmlm.data.synth import Mover, Obj


def _digest(directory) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", synth.KINDS)
def test_deterministic_per_seed(kind, tmp_path):
    num = 3 if kind == "moving_shapes" else 6
    a = synth.synthesize(kind, tmp_path / "a", num, seed=7, split="train", progress=False)
    b = synth.synthesize(kind, tmp_path / "b", num, seed=7, split="train", progress=False)
    assert _digest(a.parent) == _digest(b.parent)
    c = synth.synthesize(kind, tmp_path / "c", num, seed=8, split="train", progress=False)
    assert json.loads(a.read_text()) != json.loads(c.read_text()) or _digest(a.parent) != _digest(c.parent)


def test_record_independent_of_num_and_split_dependent(tmp_path):
    few = json.loads(synth.synthesize("shapes", tmp_path / "few", 3, 0, progress=False).read_text())
    many = json.loads(synth.synthesize("shapes", tmp_path / "many", 12, 0, progress=False).read_text())
    assert many[:3] == few
    assert (tmp_path / "few/images/shapes-train-000002.png").read_bytes() == \
        (tmp_path / "many/images/shapes-train-000002.png").read_bytes()
    val = json.loads(synth.synthesize("shapes", tmp_path / "few", 12, 0, "val", progress=False).read_text())
    assert [r["conversations"] for r in val] != [r["conversations"] for r in many]
    assert val[0]["id"] == "shapes-val-000000"


def test_llava_json_and_eval_jsonl_formats(tmp_path):
    path = synth.synthesize("shapes", tmp_path, 20, 1, "val", questions_per_image=2, progress=False)
    records = json.loads(path.read_text())
    assert len(records) == 20
    lines = [json.loads(x) for x in (tmp_path / "val_questions.jsonl").read_text().splitlines()]
    assert len(lines) == 40
    answers = set(synth.answer_words())
    for rec in records:
        turns = rec["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
        assert turns[0]["value"].startswith("<image>\n") and "<image>" not in turns[2]["value"]
        assert turns[1]["value"] in answers and turns[3]["value"] in answers
        assert (tmp_path / rec["image"]).is_file()
    for line in lines:
        assert set(line) == {"question_id", "image", "text", "answer", "category"}
        assert line["answer"] in answers and "<image>" not in line["text"]
    assert len({line["question_id"] for line in lines}) == 40
    img = preprocess.load_image(tmp_path / records[0]["image"])
    assert img.size == (64, 64)


def test_shapes_questions_match_the_scene():
    rng = np.random.default_rng(0)
    red_circle = Obj("red", "circle", 10, 10, 6, row=0, col=0)
    blue_square = Obj("blue", "square", 54, 54, 6, row=2, col=2)
    blue_cross = Obj("blue", "cross", 54, 10, 6, row=0, col=2)
    objs = [red_circle, blue_square, blue_cross]
    assert synth._shapes_qa(rng, objs, "count").answer == "three"
    for _ in range(10):
        qa = synth._shapes_qa(rng, objs, "color")  # only shapes that are unique: all three here
        shape = qa.question.split("the ")[1].rstrip("?")
        assert qa.answer == {"circle": "red", "square": "blue", "cross": "blue"}[shape]
        qa = synth._shapes_qa(rng, objs, "shape")  # blue is shared: only the red object qualifies
        assert qa.question == "What shape is the red object?" and qa.answer == "circle"
        qa = synth._shapes_qa(rng, objs, "exist")
        words = qa.question.rstrip("?").split()
        present = (words[-2], words[-1]) in {(o.color, o.shape) for o in objs}
        assert qa.answer == ("yes" if present else "no")
        qa = synth._position_qa(rng, [red_circle, blue_square])
        first = qa.question.split()[2]  # "Is the <color> ..."
        if "left or right" in qa.question:
            assert qa.answer == ("left" if first == "red" else "right")
        else:
            assert qa.answer == ("above" if first == "red" else "below")


def test_rendered_colours_at_object_centres():
    objs = [Obj("red", "circle", 12, 12, 7), Obj("green", "triangle", 50, 20, 7), Obj("blue", "cross", 30, 50, 7)]
    img = np.asarray(synth.render(objs, 64, synth.BACKGROUNDS[0]))
    for o in objs:
        np.testing.assert_allclose(img[int(o.cy), int(o.cx)], synth.COLORS[o.color], atol=2)
    np.testing.assert_array_equal(img[0, 63], synth.BACKGROUNDS[0])


def test_video_motion_and_order_of_appearance(tmp_path):
    movers = [Mover("red", "circle", 5, (10, 16), (50, 16), 0.0, "right"),
              Mover("blue", "square", 5, (32, 40), (32, 58), 2.5, "down")]
    frames = synth.render_video(movers, 64, synth.BACKGROUNDS[1])
    assert len(frames) == synth.VIDEO_FPS * synth.VIDEO_SECONDS
    path = tmp_path / "v.mp4"
    synth.encode_video(frames, synth.VIDEO_FPS, path)
    video = preprocess.decode_video(path, max_frames=8)
    assert video.indices.tolist() == [2, 6, 10, 14, 18, 22]

    def centre_of(colour, frame):
        d = np.abs(np.asarray(frame, np.int32) - np.asarray(synth.COLORS[colour])).sum(-1)
        ys, xs = np.nonzero(d < 60)
        return (xs.mean(), ys.mean()) if len(xs) > 20 else None

    reds = [centre_of("red", f) for f in video.frames]
    blues = [centre_of("blue", f) for f in video.frames]
    assert all(r is not None for r in reds)
    assert [b is None for b in blues] == [True, True, False, False, False, False]  # appears at 2.5 s
    assert reds[-1][0] > reds[0][0] + 20  # moving right
    assert blues[-1][1] > blues[2][1]  # moving down
    qa = synth._video_qa(np.random.default_rng(0), movers, "order")
    assert (qa.question, qa.answer) == ("Which color appears first?", "red")


def test_moving_shapes_files(tmp_path):
    path = synth.synthesize("moving_shapes", tmp_path, 2, 0, "train", progress=False)
    rec = json.loads(path.read_text())[0]
    assert rec["video"].endswith(".mp4") and rec["conversations"][0]["value"].startswith("<video>\n")
    video = preprocess.decode_video(tmp_path / rec["video"], max_frames=64)
    assert video.num_frames == 24 and len(video.frames) == 6


def test_corpus_covers_answers_and_rejects_bad_arguments(tmp_path):
    corpus = set(synth.corpus_sentences())
    assert set(synth.answer_words()) <= corpus
    with pytest.raises(ValueError, match="unknown kind"):
        synth.synthesize("faces", tmp_path, 1, 0)
    with pytest.raises(ValueError, match="num"):
        synth.synthesize("shapes", tmp_path, 0, 0)
    with pytest.raises(ValueError, match="split"):
        synth.synthesize("shapes", tmp_path, 1, 0, split="../x")


def _category_counts(questions_jsonl) -> dict[str, int]:
    import collections

    lines = [json.loads(x) for x in questions_jsonl.read_text().splitlines()]
    return dict(collections.Counter(line["category"] for line in lines))


def test_category_weights_shift_the_question_mix(tmp_path):
    uniform = synth.synthesize("shapes", tmp_path / "u", 200, 3, questions_per_image=3, progress=False)
    weighted = synth.synthesize("shapes", tmp_path / "w", 200, 3, questions_per_image=3, progress=False,
                                category_weights="color=4,count=0.25,position=0")
    u, w = _category_counts(uniform.parent / "train_questions.jsonl"), \
        _category_counts(weighted.parent / "train_questions.jsonl")
    assert "position" not in w and u["position"] > 50
    assert w["color"] > 2 * u["color"] and w["count"] < u["count"] / 2
    # Scenes do not depend on the question mix: the same images either way.
    assert (tmp_path / "u/images/shapes-train-000007.png").read_bytes() == \
        (tmp_path / "w/images/shapes-train-000007.png").read_bytes()
    # A mapping and the string form are the same setting; empty weights are the uniform mix.
    as_dict = synth.synthesize("shapes", tmp_path / "d", 20, 3, questions_per_image=3, progress=False,
                               category_weights={"color": 4, "count": 0.25, "position": 0})
    assert json.loads(as_dict.read_text()) == json.loads(weighted.read_text())[:20]
    empty = synth.synthesize("shapes", tmp_path / "e", 20, 3, questions_per_image=3, progress=False,
                             category_weights="")
    assert json.loads(empty.read_text()) == json.loads(uniform.read_text())[:20]


def test_weights_on_a_category_that_often_does_not_apply_still_give_a_question(tmp_path):
    """Shape questions need an object of a unique colour; a scene without one falls back to a category that
    applies (count) instead of failing the whole synthesis."""
    path = synth.synthesize("shapes", tmp_path, 300, 0, progress=False,
                            category_weights="shape=1,color=0,count=0,exist=0,position=0")
    counts = _category_counts(path.parent / "train_questions.jsonl")
    assert sum(counts.values()) == 300
    assert counts["shape"] > 250 and set(counts) <= {"shape", "color", "count"}
    assert counts["shape"] < 300  # some scenes needed the fallback (before it, synthesis raised)


def test_category_weights_errors_name_the_bad_value(tmp_path):
    with pytest.raises(ValueError, match=r"'colour'.*'color'"):
        synth.synthesize("shapes", tmp_path, 1, 0, category_weights="colour=2")
    with pytest.raises(ValueError, match="'lots'"):
        synth.synthesize("shapes", tmp_path, 1, 0, category_weights="color=lots")
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        synth.synthesize("shapes", tmp_path, 1, 0, category_weights="color")
    with pytest.raises(ValueError, match="not all 0"):
        synth.synthesize("moving_shapes", tmp_path, 1, 0, category_weights="direction=0,order=0,count=0,color=0")
    with pytest.raises(ValueError, match=">= 0"):
        synth.synthesize("shapes_hd", tmp_path, 1, 0, category_weights="shape=-1")
    assert not list(tmp_path.rglob("*.png"))  # validated before anything is rendered


# ----------------------------------------------------------------------------- grid_shapes

def _grid_objs() -> list[Obj]:
    """A hand-made grid_shapes scene (64 px, 16 px cells)."""
    def at(color, shape, row, col):
        return Obj(color, shape, 16 * col + 8, 16 * row + 8, 6, row=row, col=col)

    return [at("red", "circle", 0, 0), at("red", "square", 1, 2), at("blue", "cross", 3, 3),
            at("green", "triangle", 2, 1), at("red", "cross", 3, 0), at("yellow", "circle", 0, 3)]


def test_grid_questions_match_the_scene():
    rng = np.random.default_rng(0)
    objs = _grid_objs()
    by_cell = {(o.row, o.col): o for o in objs}
    seen = set()
    for _ in range(200):
        for category in synth.CATEGORIES["grid_shapes"]:
            qa = synth._grid_qa(rng, objs, category)
            seen.add((category, qa.answer))
            if category in ("cell_color", "cell_shape"):
                # "What color is the object in cell B3?" -> 0-based (1, 2)
                cell = qa.question.rstrip("?").split()[-1]
                row, col = synth.GRID_ROW_NAMES.index(cell[0]), int(cell[1:]) - 1
                o = by_cell[(row, col)]  # only occupied cells are asked about
                assert qa.answer == (o.color if category == "cell_color" else o.shape)
            elif category == "count_color":
                color = qa.question.split()[2]
                assert qa.answer == synth.NUMBER_WORDS[sum(o.color == color for o in objs)]
            else:
                words_q = qa.question.rstrip("?").split()
                present = (words_q[-2], words_q[-1]) in {(o.color, o.shape) for o in objs}
                assert qa.answer == ("yes" if present else "no")
    # Every cell question points at a real object, and every answer kind occurs.
    assert {a for c, a in seen if c == "count_color"} >= {"zero", "one", "three"}
    assert {a for c, a in seen if c == "exist"} == {"yes", "no"}
    assert {a for c, a in seen if c == "cell_color"} == {"red", "blue", "green", "yellow"}


@pytest.mark.parametrize("kind", ["grid_shapes", "grid_shapes_hd"])
def test_grid_scenes_one_object_per_cell_inside_its_patch(kind):
    """Objects sit in distinct cells of the 4x4 grid and inside them, so each is seen by one 16 px patch
    of the 64 px view (grid_shapes) or of its 64 px HD crop (grid_shapes_hd, 128 px)."""
    size = synth.DEFAULT_SIZES[kind]
    cell = size / synth.GRID_SIDE
    for i in range(30):
        objs = synth.grid_scene(synth.record_rng(kind, 0, "train", i), kind, size)
        assert synth.GRID_OBJECTS[0] <= len(objs) <= synth.GRID_OBJECTS[1]
        assert len({(o.row, o.col) for o in objs}) == len(objs)
        assert len({(o.color, o.shape) for o in objs}) == len(objs)
        for o in objs:
            assert o.col * cell <= o.cx - o.r and o.cx + o.r <= (o.col + 1) * cell
            assert o.row * cell <= o.cy - o.r and o.cy + o.r <= (o.row + 1) * cell
    img = np.asarray(synth.render(_grid_objs(), 64, synth.BACKGROUNDS[0]))
    for o in _grid_objs():
        np.testing.assert_allclose(img[int(o.cy), int(o.cx)], synth.COLORS[o.color], atol=2)


def test_grid_hd_shapes_are_small():
    """grid_shapes_hd: shapes ~9 px wide at 128 px, i.e. ~4-5 px in the 64 px view (the HD crops resolve them)."""
    objs = synth.grid_scene(synth.record_rng("grid_shapes_hd", 0, "train", 0), "grid_shapes_hd", 128)
    assert all(7 <= 2 * o.r <= 11 for o in objs)
    objs = synth.grid_scene(synth.record_rng("grid_shapes", 0, "train", 0), "grid_shapes", 64)
    assert all(10 <= 2 * o.r <= 14 for o in objs)


@pytest.mark.parametrize("kind", ["grid_shapes", "grid_shapes_hd"])
def test_grid_questions_tokenize(kind, tmp_path):
    """Every grid question encodes without <unk>, every answer is one token, and a 3-turn conversation
    fits the 72 tokens of configs/experiments/base.py."""
    from mmlm.data import templates
    from mmlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    path = synth.synthesize(kind, tmp_path, 40, 0, "train", questions_per_image=3, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "train_questions.jsonl").read_text().splitlines()]
    assert {line["category"] for line in lines} == set(synth.CATEGORIES[kind])
    for line in lines:
        assert 0 not in tok.encode(line["text"]), line["text"]
        assert len(tok.encode(line["answer"])) == 1, line["answer"]
    for rec in json.loads(path.read_text()):
        enc = templates.encode_conversation(tok, rec["conversations"], "vicuna_v1", 72, system="")
        assert not enc["truncated"] and enc["num_tokens"] <= 72
