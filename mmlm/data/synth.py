"""Synthetic LLaVA-format datasets that exercise every path (image, HD, video).

Kinds:

* `shapes`: 1-3 coloured shapes (6 colours x 4 shapes, distinct pairs) on a
  plain background, placed on a 3x3 grid. Questions with single-word answers
  on colour, shape, count, relative position (left/right, above/below) and
  existence. Small (default 64 px) so that a tiny model learns it in minutes.
* `shapes_hd`: 3-6 small shapes on a 4x4 grid of a larger image (default
  128 px). Shapes are ~9 px wide: at half resolution they blur into coloured
  blobs, so the shape questions (which shape, how many of a shape, is there
  a <colour> <shape>) need the HD crops.
* `grid_shapes`: 6-12 shapes (distinct colour-shape pairs) in the cells of a
  4x4 grid (default 64 px: a 16 px ViT patch per cell). Questions address
  one cell ("What color is the object in cell B3?", row B, column 3; colour or
  shape), or several objects (how many objects of a colour, is there a
  <colour> <shape>). The information grows with the vision tokens: a cell
  question needs that cell, and 16 cells of ~25 states each do not fit one
  compressed token (see "Why one token cannot solve `grid_shapes`" below).
* `grid_shapes_hd`: the same scenes and questions at 128 px with small
  shapes (~9 px wide, as in `shapes_hd`): at 64 px the colours survive but
  the shapes blur, so the shape questions need the HD crops.
* `moving_shapes`: short videos (default 64 px, 6 s at 4 fps, PyAV-encoded
  MPEG-4 MP4) of 1-2 shapes moving in straight lines, the second appearing 2-3.5 s
  after the first. Temporal questions: direction of motion, which colour
  appears first, how many objects appear, plus colour.

Output of `synthesize(kind, out_dir, num, seed, split)`:

* `OUT/{split}.json`: LLaVA JSON, a list of
  `{"id", "image" | "video", "conversations": [{"from": "human", "value":
  "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}`; videos use the
  `<video>` marker as LLaVA-Mini does. Media paths are relative to OUT, so
  `mmlm data build --json OUT/train.json --images OUT --videos OUT` builds it;
* `OUT/{split}_questions.jsonl`: one question per line (LLaVA eval style):
  `{"question_id", "image" | "video", "text", "answer", "category"}`, the
  media path relative to the JSONL's directory;
* media under `OUT/images/` or `OUT/videos/`.

Why one token cannot solve `grid_shapes` (the design of the paper-trends
experiments, `experiments/paper_trends`): the compressor's query attends over
the 16 patch features with question-independent weights, so m tokens must
carry the whole scene that any question may ask about: 16 cells, each empty
or one of 24 colour-shape pairs (16 x log2(25) = 74 bits), read back by the
LLM. A linear read-out of every cell's colour (6) and shape (4) needs
16 x 10 = 160 directions, more than the width (64-96) of the experiment
models' single token; with 4 tokens each holds a 2x2 block (40 directions),
with 16 one cell. Counting and existence are global sums, which a single
averaged token can hold. Modality pre-fusion changes the picture: the
question's text reads all 16 patches before compression, so the asked cell
is picked out and one token suffices. Hence the orderings the studies test:
accuracy rises with the budget without pre-fusion, pre-fusion closes the gap
at 1 token, and cell questions (not count/exist) carry the difference.

Everything is a pure function of (kind, seed, split, record index): record i is
the same whatever `num` is, and different splits never share a random stream.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import zlib
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from mmlm.errors import UserError
from mmlm.safe_io import atomic_file, write_text_atomic

# Bumped whenever what a kind renders or asks changes, so that datasets built before are rebuilt
# (`mmlm.train.data` keys its build cache on it). 2: grid cells are named "B3", not "row two, column three".
DATA_VERSION = 2
KINDS = ("shapes", "shapes_hd", "grid_shapes", "grid_shapes_hd", "moving_shapes")
# Question categories of each kind (the keys `category_weights` may use).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "shapes": ("color", "shape", "count", "position", "exist"),
    "shapes_hd": ("shape", "count_shape", "exist"),
    "grid_shapes": ("cell_color", "cell_shape", "count_color", "exist"),
    "grid_shapes_hd": ("cell_color", "cell_shape", "count_color", "exist"),
    "moving_shapes": ("direction", "order", "count", "color"),
}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 205, 35),
    "purple": (150, 60, 200),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# Neutral backgrounds, far from every object colour.
BACKGROUNDS = ((245, 245, 245), (128, 128, 128), (25, 25, 25))
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
DIRECTIONS = ("left", "right", "up", "down")

# Question templates per category (the tokenizer corpus enumerates them all).
Q_COLOR = "What color is the {shape}?"
Q_SHAPE = "What shape is the {color} object?"
Q_COUNT = "How many objects are there?"
Q_COUNT_SHAPE = "How many {plural} are there?"
Q_LEFT_RIGHT = "Is the {color} {shape} left or right of the {color2} {shape2}?"
Q_ABOVE_BELOW = "Is the {color} {shape} above or below the {color2} {shape2}?"
Q_EXIST = "Is there a {color} {shape}?"
Q_DIRECTION = "Which way is the {color} {shape} moving?"
Q_FIRST = "Which color appears first?"
Q_COUNT_VIDEO = "How many objects appear in the video?"
Q_CELL_COLOR = "What color is the object in cell {cell}?"
Q_CELL_SHAPE = "What shape is the object in cell {cell}?"
Q_COUNT_COLOR = "How many {color} objects are there?"

GRID_SIDE = 4  # grid_shapes: cells per side of the scene grid
GRID_ROW_NAMES = "ABCD"  # grid_shapes: row names, top to bottom (columns are 1..4, left to right)
GRID_OBJECTS = (6, 12)  # grid_shapes: objects per scene, inclusive range
# Object radius as a fraction of the image side: grid_shapes objects fill most of their cell
# (11-14 px of a 16 px cell at 64 px); grid_shapes_hd objects are ~9 px wide at 128 px (4-5 px at 64 px).
GRID_RADIUS = {"grid_shapes": (0.085, 0.105), "grid_shapes_hd": (0.032, 0.040)}

DEFAULT_SIZES = {"shapes": 64, "shapes_hd": 128, "grid_shapes": 64, "grid_shapes_hd": 128, "moving_shapes": 64}
VIDEO_FPS = 4  # frames per second of the synthetic videos
VIDEO_SECONDS = 6.0
_SUPERSAMPLE = 4  # shapes are drawn 4x larger then box-filtered (anti-aliasing)


@dataclasses.dataclass(frozen=True)
class Obj:
    """A shape in a scene; (cx, cy, r) in pixels of the output image."""

    color: str
    shape: str
    cx: float
    cy: float
    r: float
    row: int = 0
    col: int = 0


@dataclasses.dataclass(frozen=True)
class QA:
    category: str
    question: str
    answer: str


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def record_rng(kind: str, seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one record: a function of (kind, seed, split, index)."""
    return np.random.default_rng([int(seed), _stable_hash(kind), _stable_hash(split), int(index)])


# ----------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------

def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                color: tuple[int, int, int]) -> None:
    """Draws one shape of radius r centred at (cx, cy), coordinates in canvas pixels."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        s = 0.85 * r  # a square of the same visual weight as the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=color)
    elif shape == "cross":
        w = 0.36 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(objs: Sequence[Obj], size: int, background: tuple[int, int, int]) -> Image.Image:
    """Renders shapes on a plain background, anti-aliased by supersampling."""
    big = Image.new("RGB", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), background)
    draw = ImageDraw.Draw(big)
    for o in objs:
        s = _SUPERSAMPLE
        _draw_shape(draw, o.shape, o.cx * s, o.cy * s, o.r * s, COLORS[o.color])
    return big.reduce(_SUPERSAMPLE)


# ----------------------------------------------------------------------------
# Scenes and questions (still images)
# ----------------------------------------------------------------------------

def _distinct_pairs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n distinct (colour, shape) pairs."""
    pairs = list(itertools.product(COLORS, SHAPES))
    picks = rng.choice(len(pairs), size=n, replace=False)
    return [pairs[int(i)] for i in picks]


def _grid_scene(rng: np.random.Generator, size: int, grid: int, n: int,
                radius: tuple[float, float]) -> list[Obj]:
    """n objects in distinct cells of a grid x grid layout, jittered in their cell."""
    cell = size / grid
    cells = rng.choice(grid * grid, size=n, replace=False)
    objs = []
    for (color, shape), c in zip(_distinct_pairs(rng, n), cells):
        row, col = divmod(int(c), grid)
        r = float(rng.uniform(*radius))
        slack = max(cell / 2 - r - 1.0, 0.0)  # keep the shape inside its cell
        cx = (col + 0.5) * cell + float(rng.uniform(-slack, slack))
        cy = (row + 0.5) * cell + float(rng.uniform(-slack, slack))
        objs.append(Obj(color, shape, cx, cy, r, row, col))
    return objs


def _unique(objs: Sequence[Obj], attr: str) -> list[Obj]:
    """Objects whose `attr` value no other object shares."""
    values = [getattr(o, attr) for o in objs]
    return [o for o in objs if values.count(getattr(o, attr)) == 1]


def _absent_pair(rng: np.random.Generator, objs: Sequence[Obj]) -> tuple[str, str]:
    """A (colour, shape) pair not in the scene; half the time a near miss."""
    present = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        o = objs[int(rng.integers(len(objs)))]
        near = [(o.color, s) for s in SHAPES] + [(c, o.shape) for c in COLORS]
        near = [p for p in near if p not in present]
        if near:
            return near[int(rng.integers(len(near)))]
    absent = [p for p in itertools.product(COLORS, SHAPES) if p not in present]
    return absent[int(rng.integers(len(absent)))]


def _position_qa(rng: np.random.Generator, objs: Sequence[Obj]) -> QA | None:
    """A left/right or above/below question on two objects in different columns/rows."""
    pairs = [(a, b) for a, b in itertools.permutations(objs, 2) if a.col != b.col or a.row != b.row]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    options = []
    if a.col != b.col:
        options.append(QA("position", Q_LEFT_RIGHT.format(color=a.color, shape=a.shape, color2=b.color,
                                                          shape2=b.shape), "left" if a.col < b.col else "right"))
    if a.row != b.row:
        options.append(QA("position", Q_ABOVE_BELOW.format(color=a.color, shape=a.shape, color2=b.color,
                                                           shape2=b.shape), "above" if a.row < b.row else "below"))
    return options[int(rng.integers(len(options)))]


def _shapes_qa(rng: np.random.Generator, objs: Sequence[Obj], category: str) -> QA | None:
    """One question of `category` about a `shapes` scene, or None if not applicable."""
    if category in ("color", "shape"):
        # Ask for one attribute of an object named by the other (which must be unique in the scene).
        named_by, question = ("shape", Q_COLOR) if category == "color" else ("color", Q_SHAPE)
        cands = _unique(objs, named_by)
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        return QA(category, question.format(**{named_by: getattr(o, named_by)}), getattr(o, category))
    if category == "count":
        return QA(category, Q_COUNT, NUMBER_WORDS[len(objs)])
    if category == "position":
        return _position_qa(rng, objs)
    if category == "exist":
        if rng.random() < 0.5:
            o = objs[int(rng.integers(len(objs)))]
            return QA(category, Q_EXIST.format(color=o.color, shape=o.shape), "yes")
        color, shape = _absent_pair(rng, objs)
        return QA(category, Q_EXIST.format(color=color, shape=shape), "no")
    raise ValueError(category)


def _hd_qa(rng: np.random.Generator, objs: Sequence[Obj], category: str) -> QA | None:
    """Shape-centric questions for `shapes_hd` (the shape needs high resolution)."""
    if category == "shape":
        return _shapes_qa(rng, objs, "shape")
    if category == "count_shape":
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        n = sum(o.shape == shape for o in objs)
        return QA(category, Q_COUNT_SHAPE.format(plural=PLURALS[shape]), NUMBER_WORDS[n])
    if category == "exist":
        if rng.random() < 0.5:
            o = objs[int(rng.integers(len(objs)))]
            return QA(category, Q_EXIST.format(color=o.color, shape=o.shape), "yes")
        # Near misses only: same colour, other shape; the colour alone does not tell.
        present = {(o.color, o.shape) for o in objs}
        o = objs[int(rng.integers(len(objs)))]
        near = [(o.color, s) for s in SHAPES if (o.color, s) not in present]
        if not near:
            return None
        color, shape = near[int(rng.integers(len(near)))]
        return QA(category, Q_EXIST.format(color=color, shape=shape), "no")
    raise ValueError(category)


def cell_words(row: int, col: int) -> dict[str, str]:
    """Template fields naming grid cell (row, col), 0-based, as on a chessboard: "B3" is row two, column three.

    Rows are letters and columns digits, so the row and the column are told
    apart by the tokens themselves. With "row two, column three" the same
    number words name both, and a small LLM has to bind each to the word
    before it first; the 2-layer models of the paper-trend studies did not
    learn that (`configs/experiments/base.py`).
    """
    return {"cell": f"{GRID_ROW_NAMES[row]}{col + 1}"}


def _grid_qa(rng: np.random.Generator, objs: Sequence[Obj], category: str) -> QA | None:
    """One question of `category` about a `grid_shapes(_hd)` scene (every category always applies)."""
    if category in ("cell_color", "cell_shape"):
        o = objs[int(rng.integers(len(objs)))]
        template, attr = (Q_CELL_COLOR, "color") if category == "cell_color" else (Q_CELL_SHAPE, "shape")
        return QA(category, template.format(**cell_words(o.row, o.col)), getattr(o, attr))
    if category == "count_color":
        # Half the time a colour in the scene, else any colour (absent colours make "zero" common enough).
        present = sorted({o.color for o in objs})
        color = present[int(rng.integers(len(present)))] if rng.random() < 0.5 else \
            list(COLORS)[int(rng.integers(len(COLORS)))]
        return QA(category, Q_COUNT_COLOR.format(color=color), NUMBER_WORDS[sum(o.color == color for o in objs)])
    if category == "exist":
        return _shapes_qa(rng, objs, "exist")  # the same question (and random draws) as `shapes`
    raise ValueError(category)


def grid_scene(rng: np.random.Generator, kind: str, size: int) -> list[Obj]:
    """A `grid_shapes(_hd)` scene: GRID_OBJECTS objects, distinct colour-shape pairs, one per cell."""
    n = int(rng.integers(GRID_OBJECTS[0], GRID_OBJECTS[1] + 1))
    lo, hi = GRID_RADIUS[kind]
    return _grid_scene(rng, size, GRID_SIDE, n, (lo * size, hi * size))


def parse_category_weights(spec: str | Mapping[str, float] | None) -> dict[str, float]:
    """`"color=3,shape=3,count=0.5"` (or a mapping) -> {category: weight}; "" / None -> {} (uniform)."""
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        items = []
        for part in str(spec).split(","):
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"category weights {spec!r}: expected NAME=WEIGHT[,NAME=WEIGHT...], "
                                 f"got {part!r}")
            items.append((name.strip(), value.strip()))
    out = {}
    for name, value in items:
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"category weight of {name!r} must be a number, got {value!r}") from None
    return out


def category_probabilities(kind: str, weights: Mapping[str, float] | None) -> np.ndarray | None:
    """Sampling probabilities over `CATEGORIES[kind]` (None = uniform); unlisted categories weigh 1."""
    if not weights:
        return None
    cats = CATEGORIES[kind]
    unknown = sorted(set(weights) - set(cats))
    if unknown:
        raise ValueError(f"unknown question categories {unknown} for kind {kind!r}; it has {list(cats)}")
    w = np.array([float(weights.get(c, 1.0)) for c in cats])
    if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError(f"category weights must be finite, >= 0 and not all 0; got {dict(weights)}")
    return w / w.sum()


def _pick_questions(rng: np.random.Generator, categories: Sequence[str], make, n: int,
                    probs: np.ndarray | None = None) -> list[QA]:
    """n questions with distinct texts; each draw picks a category (uniformly, or with `probs`) and
    is redrawn when that category does not apply to the scene."""
    out: list[QA] = []
    for _ in range(8 * n):
        if len(out) == n:
            break
        # The uniform draw keeps its original form so that existing datasets stay bit-identical.
        pick = int(rng.integers(len(categories))) if probs is None else int(rng.choice(len(categories), p=probs))
        qa = make(categories[pick])
        if qa is not None and all(qa.question != q.question for q in out):
            out.append(qa)
    if not out:
        # Every draw hit a category that does not apply here (likely only when the weights favour such
        # categories): take the first that applies, weighted categories first. Datasets whose draws
        # succeed are unchanged.
        weighted = [c for i, c in enumerate(categories) if probs is None or probs[i] > 0]
        for category in weighted + [c for c in categories if c not in weighted]:
            qa = make(category)
            if qa is not None:
                return [qa]
        raise RuntimeError("no applicable question")  # cannot happen: count always applies
    return out


# ----------------------------------------------------------------------------
# Videos
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Mover:
    """A shape that appears at `t0` seconds and moves from start to end by the last frame."""

    color: str
    shape: str
    r: float
    start: tuple[float, float]
    end: tuple[float, float]
    t0: float
    direction: str

    def at(self, t: float, duration: float) -> Obj | None:
        if t < self.t0:
            return None
        a = (t - self.t0) / max(duration - self.t0, 1e-6)
        x = self.start[0] + a * (self.end[0] - self.start[0])
        y = self.start[1] + a * (self.end[1] - self.start[1])
        return Obj(self.color, self.shape, x, y, self.r)


def _movers(rng: np.random.Generator, size: int) -> list[Mover]:
    """1-2 movers; with two, each keeps to its own half (lane) of the frame."""
    n = int(rng.integers(1, 3))
    pairs = _distinct_pairs(rng, n)
    colors = [c for c, _ in pairs]
    if len(set(colors)) < n:  # "which colour appears first" needs distinct colours
        pairs[1] = (next(c for c in COLORS if c != colors[0]), pairs[1][1])
    r = size * 0.09
    lanes = [(0.0, float(size))] if n == 1 else [(0.0, size / 2), (size / 2, float(size))]
    movers = []
    for i, ((color, shape), (lo, hi)) in enumerate(zip(pairs, lanes)):
        direction = DIRECTIONS[int(rng.integers(4))]
        t0 = 0.0 if i == 0 else float(rng.uniform(2.0, 3.5))
        margin = r + 1.0
        if direction in ("left", "right"):
            y = float(rng.uniform(lo + margin, hi - margin))
            travel = float(rng.uniform(0.5, 0.7)) * size
            x0 = float(rng.uniform(margin, size - margin - travel))
            xs = (x0, x0 + travel) if direction == "right" else (x0 + travel, x0)
            start, end = (xs[0], y), (xs[1], y)
        else:
            x = float(rng.uniform(margin, size - margin))
            y0, y1 = lo + margin, hi - margin
            start, end = ((x, y0), (x, y1)) if direction == "down" else ((x, y1), (x, y0))
        movers.append(Mover(color, shape, r, start, end, t0, direction))
    return movers


def _video_qa(rng: np.random.Generator, movers: Sequence[Mover], category: str) -> QA | None:
    if category == "direction":
        m = movers[int(rng.integers(len(movers)))]
        return QA(category, Q_DIRECTION.format(color=m.color, shape=m.shape), m.direction)
    if category == "order":
        if len(movers) < 2:
            return None
        return QA(category, Q_FIRST, min(movers, key=lambda m: m.t0).color)
    if category == "count":
        return QA(category, Q_COUNT_VIDEO, NUMBER_WORDS[len(movers)])
    if category == "color":
        m = movers[int(rng.integers(len(movers)))]
        return QA(category, Q_COLOR.format(shape=m.shape), m.color)
    raise ValueError(category)


def encode_video(frames: Sequence[np.ndarray], fps: int, path: str | os.PathLike) -> None:
    """Writes uint8 (H, W, 3) frames as an MPEG-4 Part 2 MP4 with PyAV.

    `mpeg4` (libavcodec's own encoder, single-threaded, constant 1 Mb/s,
    which at these sizes means near-lossless colours) is byte-for-byte
    deterministic; libx264 was not in processes that had TensorFlow loaded.
    """
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = 1_000_000
        stream.codec_context.thread_count = 1
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def render_video(movers: Sequence[Mover], size: int, background: tuple[int, int, int],
                 fps: int = VIDEO_FPS, seconds: float = VIDEO_SECONDS) -> list[np.ndarray]:
    """Frames (uint8 (size, size, 3)) of the movers at `fps` for `seconds`."""
    n = int(round(fps * seconds))
    frames = []
    for k in range(n):
        t = k / fps
        objs = [o for o in (m.at(t, seconds) for m in movers) if o is not None]
        frames.append(np.asarray(render(objs, size, background), np.uint8))
    return frames


# ----------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------

def _conversation(qas: Sequence[QA], marker: str) -> list[dict[str, str]]:
    turns = []
    for j, qa in enumerate(qas):
        turns.append({"from": "human", "value": (marker + "\n" if j == 0 else "") + qa.question})
        turns.append({"from": "gpt", "value": qa.answer})
    return turns


IMAGE_KINDS = ("shapes", "shapes_hd", "grid_shapes", "grid_shapes_hd")


def _image_scene(rng: np.random.Generator, kind: str, image_size: int) -> list[Obj]:
    """The objects of a still-image scene of `kind` (the draws right after the background's)."""
    if kind == "shapes":
        return _grid_scene(rng, image_size, 3, int(rng.integers(1, 4)), (0.11 * image_size, 0.145 * image_size))
    if kind == "shapes_hd":
        return _grid_scene(rng, image_size, 4, int(rng.integers(3, 7)), (0.032 * image_size, 0.040 * image_size))
    if kind in ("grid_shapes", "grid_shapes_hd"):
        return grid_scene(rng, kind, image_size)
    raise ValueError(f"unknown image kind {kind!r}; choose from {IMAGE_KINDS}")


def scene(kind: str, index: int, seed: int, split: str, image_size: int) -> tuple[Image.Image, list[Obj]]:
    """Record `index`'s image and objects, exactly as `make_record` renders them (still-image kinds)."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"scene() renders still images; {kind!r} is not one of {IMAGE_KINDS}")
    rng = record_rng(kind, seed, split, index)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    objs = _image_scene(rng, kind, image_size)
    return render(objs, image_size, background), objs


def patch_labels(objs: Sequence[Obj], image_size: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch labels of a scene seen as a grid x grid patch raster (row-major, as the ViT flattens it).

    A patch is labelled with the object whose centre lies in it: colour index + 1 into `COLORS` and shape
    index + 1 into `SHAPES`, 0 for a patch without an object centre. Returns two int32 arrays (grid*grid,).
    """
    colors, shapes = np.zeros(grid * grid, np.int32), np.zeros(grid * grid, np.int32)
    color_ids = {c: i + 1 for i, c in enumerate(COLORS)}
    for o in objs:
        col = min(int(o.cx * grid / image_size), grid - 1)
        row = min(int(o.cy * grid / image_size), grid - 1)
        colors[row * grid + col] = color_ids[o.color]
        shapes[row * grid + col] = SHAPES.index(o.shape) + 1
    return colors, shapes


def make_record(kind: str, index: int, seed: int, split: str, out_dir: Path, *,
                image_size: int, questions_per_image: int,
                category_probs: np.ndarray | None = None) -> tuple[dict, list[dict]]:
    """Renders record `index`: writes its media, returns (LLaVA record, eval lines).

    `category_probs`: `category_probabilities(kind, weights)` (None = uniform).
    """
    rng = record_rng(kind, seed, split, index)
    rec_id = f"{kind}-{split}-{index:06d}"
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]

    def pick(make) -> list[QA]:
        return _pick_questions(rng, CATEGORIES[kind], make, questions_per_image, category_probs)

    if kind == "moving_shapes":
        movers = _movers(rng, image_size)
        qas = pick(lambda c: _video_qa(rng, movers, c))
        rel = media_path(kind, split, index)
        with atomic_file(out_dir / rel, fsync=False) as tmp:
            encode_video(render_video(movers, image_size, background), VIDEO_FPS, tmp)
        media_key, marker = "video", "<video>"
    else:
        objs = _image_scene(rng, kind, image_size)
        qa = {"shapes": _shapes_qa, "shapes_hd": _hd_qa, "grid_shapes": _grid_qa, "grid_shapes_hd": _grid_qa}[kind]
        qas = pick(lambda c: qa(rng, objs, c))
        rel = media_path(kind, split, index)
        with atomic_file(out_dir / rel, fsync=False) as tmp:
            render(objs, image_size, background).save(tmp, format="PNG")
        media_key, marker = "image", "<image>"
    record = {"id": rec_id, media_key: rel, "conversations": _conversation(qas, marker)}
    lines = [{"question_id": rec_id if len(qas) == 1 else f"{rec_id}-q{j}", media_key: rel,
              "text": qa.question, "answer": qa.answer, "category": qa.category}
             for j, qa in enumerate(qas)]
    return record, lines


def synthesize(kind: str, out_dir: str | os.PathLike, num: int, seed: int, split: str = "train", *,
               image_size: int | None = None, questions_per_image: int = 1,
               category_weights: Mapping[str, float] | str | None = None, overwrite: bool = False,
               progress: bool = True) -> Path:
    """Writes a synthetic LLaVA dataset split; returns the path of its JSON.

    Args:
      kind: one of `KINDS` ("shapes", "shapes_hd", "grid_shapes", "grid_shapes_hd", "moving_shapes").
      out_dir: output directory (created); several splits may share it.
      num: number of records (images or videos).
      seed: random seed; with `split` and the record index it fixes everything.
      split: split name, e.g. "train", "val", "test".
      image_size: image / video side in pixels (defaults: `DEFAULT_SIZES`).
      questions_per_image: question-answer turns per record (multi-turn
        conversations when > 1; the eval JSONL gets one line per question).
      category_weights: relative frequency of each question category
        (`{"color": 3, "count": 0.5}` or `"color=3,count=0.5"`; unlisted
        categories weigh 1; None = uniform). A category that does not apply
        to a scene (e.g. position with one object) is redrawn, so the
        realised mix also depends on the scenes.
      overwrite: replace files of an earlier synthesis (the split's JSON,
        JSONL or media); without it they make it refuse (`UserError`)
        before anything is written. Each file is replaced atomically.
      progress: show a tqdm progress bar.

    Returns:
      `out_dir/{split}.json`; `out_dir/{split}_questions.jsonl` sits next to it.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if questions_per_image < 1:
        raise ValueError(f"questions_per_image must be >= 1, got {questions_per_image}")
    probs = category_probabilities(kind, parse_category_weights(category_weights))  # fails before rendering
    if not split or any(ch in split for ch in "/\\") or split.startswith("."):
        raise ValueError(f"invalid split name {split!r}")
    size = int(image_size or DEFAULT_SIZES[kind])
    if size < 16 or (kind == "moving_shapes" and size % 2):
        raise ValueError(f"image_size must be >= 16 (and even for videos), got {size}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a directory; give a directory path")
    if not overwrite:
        _refuse_earlier_files(out, [f"{split}.json", f"{split}_questions.jsonl"]
                              + [media_path(kind, split, i) for i in range(num)], split)
    (out / ("videos" if kind == "moving_shapes" else "images")).mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    records, lines = [], []
    for i in tqdm(range(num), desc=f"synth {kind}/{split}", unit="rec", disable=not progress):
        rec, qs = make_record(kind, i, seed, split, out, image_size=size,
                              questions_per_image=questions_per_image, category_probs=probs)
        records.append(rec)
        lines += qs
    json_path = out / f"{split}.json"
    write_text_atomic(json_path, json.dumps(records, indent=1) + "\n")
    write_text_atomic(out / f"{split}_questions.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    return json_path


def media_path(kind: str, split: str, index: int) -> str:
    """The path of record `index`'s image or video, relative to the output directory."""
    rec_id = f"{kind}-{split}-{index:06d}"
    return f"videos/{rec_id}.mp4" if kind == "moving_shapes" else f"images/{rec_id}.png"


def _refuse_earlier_files(out: Path, rels: Sequence[str], split: str) -> None:
    existing = [rel for rel in rels if os.path.lexists(out / rel)]
    if existing:
        raise UserError(f"--out {str(out)!r} already holds {len(existing)} file(s) this synthesis writes (e.g. "
                        f"{str(out / existing[0])!r}); pass --overwrite to replace them, or choose another --out "
                        f"or --split (now {split!r})")


# ----------------------------------------------------------------------------
# Tokenizer corpus
# ----------------------------------------------------------------------------

def corpus_sentences() -> Iterator[str]:
    """Every question and answer the synthesisers can emit (for the tokenizer)."""
    colors, shapes = list(COLORS), list(SHAPES)
    for shape in shapes:
        yield Q_COLOR.format(shape=shape)
        yield Q_COUNT_SHAPE.format(plural=PLURALS[shape])
    for color in colors:
        yield Q_SHAPE.format(color=color)
    for color, shape in itertools.product(colors, shapes):
        yield Q_EXIST.format(color=color, shape=shape)
        yield Q_DIRECTION.format(color=color, shape=shape)
    for (c1, s1), (c2, s2) in itertools.permutations(itertools.product(colors, shapes), 2):
        yield Q_LEFT_RIGHT.format(color=c1, shape=s1, color2=c2, shape2=s2)
        yield Q_ABOVE_BELOW.format(color=c1, shape=s1, color2=c2, shape2=s2)
    yield Q_COUNT
    yield Q_FIRST
    yield Q_COUNT_VIDEO
    yield from answer_words()


def grid_sentences() -> Iterator[str]:
    """The questions only the grid kinds emit.

    They are not in the tokenizer's training corpus (`corpus_sentences`): the
    shipped tiny tokenizer predates them, and retraining it would renumber its
    pieces and change what the demo learns from the same seed. They encode
    without `<unk>` and their answers are existing single-piece words all the
    same (`mmlm.data.make_tokenizer.check_tokenizer` checks both).
    """
    for color in COLORS:
        yield Q_COUNT_COLOR.format(color=color)
    for row, col in itertools.product(range(GRID_SIDE), repeat=2):
        yield Q_CELL_COLOR.format(**cell_words(row, col))
        yield Q_CELL_SHAPE.format(**cell_words(row, col))


def answer_words() -> list[str]:
    """All single-word answers (each should be one token of the tiny tokenizer)."""
    return sorted(set(COLORS) | set(SHAPES) | set(NUMBER_WORDS) | set(DIRECTIONS)
                  | {"left", "right", "above", "below", "yes", "no"})
