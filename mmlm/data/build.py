"""`mmlm data build`: LLaVA JSON + media -> a TFDS dataset of ArrayRecord shards.

Input: LLaVA JSON (a list of records, or JSON Lines when the file ends in
`.jsonl`), each `{"id", "image" | "video", "conversations": [{"from":
"human"|"gpt", "value"}, ...]}` with one `<image>` marker (or `<video>` for
videos, as in LLaVA-Mini) in the first human turn; records without media have
no marker. Media paths are relative to `--images` / `--videos`.

Output, under OUT:

* `NAME/1.0.0/NAME-SPLIT.array_record-*` plus TFDS metadata (`dataset_info.json`,
  `features.json`); readable with `tfds.builder_from_directory(...)
  .as_data_source(split)`, which needs no TensorFlow;
* `mmlm_dataset.json`: what `mmlm.data.pipeline` reads (name, version, splits,
  media counts, video sampling);
* `build_report.json`: `{"written": int, "skipped": {reason: int},
  "examples": {reason: [record id, ...]}, "splits": {split: {...}}}` (at most
  `MAX_REPORTED_IDS` ids per reason; the id is the record's "id", or
  "#INDEX" when it has none). With text settings (`text=`, the CLI's
  `--tokenizer/--template/--max-text-len`) also `"text_settings"` and per
  split `"text"`: how many written conversations that text length cuts, and
  how many of those keep no supervised token (`mmlm.data.supervision`).

Each stored example keeps the record's position in its JSON (`index`, the
pipeline's `example_id`), its id, the normalised conversation (JSON text,
markers as `<image>`), the original image file bytes (validated by a full
decode), or for videos the frames sampled at `video_fps` (middle of each
segment, at most `max_video_frames`), re-encoded as JPEG (quality 95, longest
side at most `max_frame_side`) with their timestamps. The pipeline resizes
and normalises at load time, so one build serves any image size / HD grid.

Bad records never stop the build and are never dropped silently; each is
skipped under one reason (checked in this order):

  malformed_record      not an object, no/invalid conversations, unknown
                        role, turns not alternating, unreadable JSONL line
                        or JSON nested too deeply to parse
  non_utf8_text         a string that is not valid UTF-8 (bad bytes in the
                        file, or lone surrogate escapes)
  no_assistant_turn     no gpt/assistant turn to learn from
  image_marker_mismatch media without exactly one marker in the first human
                        turn, or a marker without media
  path_escapes_root     the media path resolves outside its root directory
  missing_file          the media file does not exist (or no --videos given)
  undecodable_image     PIL cannot decode the image
  undecodable_video     PyAV cannot decode a frame of the video
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from mmlm.data import templates
from mmlm.data.supervision import Counts, TextSettings, classify
from mmlm.errors import UserError
from mmlm.safe_io import DirectoryReplacement, check_not_input, confined_path, write_text_atomic

DATASET_VERSION = "1.0.0"
META_FILE = "mmlm_dataset.json"
REPORT_FILE = "build_report.json"
MAX_REPORTED_IDS = 100
REASONS = ("malformed_record", "non_utf8_text", "no_assistant_turn", "image_marker_mismatch",
           "path_escapes_root", "missing_file", "undecodable_image", "undecodable_video")
MEDIA_NAMES = ("none", "image", "video")  # ClassLabel names of the "media" feature
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class BuildError(UserError, RuntimeError):
    """A problem with the build as a whole (bad arguments, unreadable JSON)."""


@dataclasses.dataclass
class BuildOptions:
    """How media are read and stored."""

    images_dir: Path | None
    videos_dir: Path | None
    max_video_frames: int = 64  # cap on frames stored per video
    video_fps: float = 1.0  # frames sampled per second of video
    max_frame_side: int = 768  # stored video frames are downscaled to fit this
    jpeg_quality: int = 95
    text: TextSettings | None = None  # count conversations this text length cuts (`mmlm.data.supervision`)
    tokenizer: Any = None  # the opened `text.tokenizer`


@dataclasses.dataclass
class Skip:
    """Why a record was not written."""

    reason: str
    record_id: str
    detail: str = ""


# ----------------------------------------------------------------------------
# Reading the JSON
# ----------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    """File text; invalid UTF-8 bytes become lone surrogates (caught per record)."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def read_records(path: str | os.PathLike) -> list[Any]:
    """Raw records of a LLaVA JSON (list) or JSON Lines file.

    A JSONL line that does not parse becomes a `_BadLine` record (skipped as
    malformed_record). A .json file that does not parse raises BuildError.
    """
    p = Path(path)
    if p.is_dir():
        raise BuildError(f"JSON file {str(p)!r} is a directory; give the LLaVA .json or .jsonl file in it")
    if not p.is_file():
        raise BuildError(f"JSON file {str(p)!r} does not exist")
    text = _read_text(p)
    if p.suffix == ".jsonl":
        out: list[Any] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                out.append(_BadLine(n, str(e)))
            except RecursionError:
                out.append(_BadLine(n, _TOO_DEEP))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BuildError(f"{p}: not valid JSON ({e}); use .jsonl for one record per line") from None
    except RecursionError:  # one absurdly nested record must not stop the build: parse record by record
        data = _records_one_by_one(text, p)
    if not isinstance(data, list):
        raise BuildError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
    return data


_TOO_DEEP = "JSON nested too deeply to parse"
# A JSON string, or one structural character (the scanner of `_records_one_by_one`).
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]', re.DOTALL)


def _records_one_by_one(text: str, path: Path) -> list[Any]:
    """The records of a JSON list parsed one at a time; a record nested too deeply becomes a `_BadLine`.

    Used only when parsing the whole file hit Python's recursion limit: a scan of strings and brackets
    finds where each top-level element starts and ends.
    """
    start = len(text) - len(text.lstrip())
    if not text.startswith("[", start):
        raise BuildError(f"{path}: JSON nested too deeply to parse, and not a list of records")
    out: list[Any] = []
    depth, begin = 0, start + 1
    for m in _JSON_TOKEN.finditer(text, start):
        tok = m.group()
        if tok in "[{":
            depth += 1
        elif tok in "]}":
            depth -= 1
        if depth == 0 or (depth == 1 and tok == ","):
            chunk = text[begin:m.start()]
            begin = m.end()
            if chunk.strip():
                line = text.count("\n", 0, m.start() - len(chunk)) + 1
                try:
                    out.append(json.loads(chunk))
                except json.JSONDecodeError as e:
                    raise BuildError(f"{path}: not valid JSON near line {line} ({e})") from None
                except RecursionError:
                    out.append(_BadLine(line, _TOO_DEEP, f"#{len(out)}"))
            if depth == 0:
                return out
    raise BuildError(f"{path}: not valid JSON (the list of records is not closed)")


@dataclasses.dataclass
class _BadLine:
    """A record that could not be parsed (JSONL line or position in a JSON list), skipped as malformed."""

    line: int
    error: str
    label: str = ""  # the record's name in the report; "" = "line LINE" (JSONL)


# ----------------------------------------------------------------------------
# Validating one record
# ----------------------------------------------------------------------------

def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _all_utf8(obj: Any) -> bool:
    """True if every string (keys included) in a JSON value is valid UTF-8."""
    if isinstance(obj, str):
        return _is_utf8(obj)
    if isinstance(obj, Mapping):
        return all(_all_utf8(k) and _all_utf8(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_all_utf8(v) for v in obj)
    return True


def record_id(raw: Any, index: int) -> str:
    """The record's "id" as text, or "#INDEX" if it has no usable id."""
    if isinstance(raw, _BadLine):
        return raw.label or f"line {raw.line}"
    rid = raw.get("id") if isinstance(raw, Mapping) else None
    if isinstance(rid, (str, int)) and not isinstance(rid, bool) and _is_utf8(str(rid)) and str(rid):
        return str(rid)
    return f"#{index}"


# `root/rel` resolved (symlinks too); None if it lies outside `root` (shared with eval and the server).
resolve_media = confined_path


def _media_field(raw: Mapping[str, Any]) -> tuple[str, str | None] | Skip | None:
    """("image"|"video", relative path); None without media; Skip if malformed."""
    found = []
    for key in ("image", "video"):
        value = raw.get(key)
        if value is None or value == "" or value == []:
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str) or not value:
            return Skip("malformed_record", "", f"{key!r} must be one path string, got {value!r}"[:200])
        found.append((key, value))
    if len(found) > 1:
        return Skip("malformed_record", "", "record has both an image and a video")
    return found[0] if found else None


def check_record(raw: Any, index: int, options: BuildOptions) -> dict[str, Any] | Skip:
    """Validates a record without reading media.

    Returns a partial example (index, id, conversations, media kind, path)
    or a Skip with the reason.
    """
    rid = record_id(raw, index)
    if isinstance(raw, _BadLine):
        return Skip("malformed_record", rid, f"JSON error: {raw.error}")
    if not isinstance(raw, Mapping):
        return Skip("malformed_record", rid, f"record is a {type(raw).__name__}, expected an object")
    if not _all_utf8(raw):
        return Skip("non_utf8_text", rid, "text is not valid UTF-8")
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return Skip("malformed_record", rid, "missing or empty 'conversations' list")
    media = _media_field(raw)
    if isinstance(media, Skip):
        return dataclasses.replace(media, record_id=rid)
    try:
        raw_turns = []
        for i, t in enumerate(conversations):
            if not isinstance(t, Mapping) or not isinstance(t.get("value"), str):
                raise ValueError(f"turn {i} must be an object with a string 'value'")
            raw_turns.append(t)
        roles = [templates.ROLE_ALIASES.get(str(t.get("from", "")).lower()) for t in raw_turns]
        if None in roles:
            raise ValueError(f"unknown role {raw_turns[roles.index(None)].get('from')!r}")
        if templates.HUMAN not in roles:
            raise ValueError("no human turn")
        if templates.GPT not in roles[roles.index(templates.HUMAN):]:
            return Skip("no_assistant_turn", rid, "no gpt turn after the first human turn")
        turns = templates.normalize_turns(raw_turns)
    except ValueError as e:
        return Skip("malformed_record", rid, str(e))
    kind = media[0] if media else "none"
    counts = [templates.count_markers(text) for _, text in turns]
    video_markers = sum(text.count(templates.VIDEO_MARKER) for _, text in turns)
    if kind == "none":
        if sum(counts):
            return Skip("image_marker_mismatch", rid, f"{sum(counts)} marker(s) but no image/video")
    elif sum(counts) != 1 or counts[0] != 1:
        return Skip("image_marker_mismatch", rid,
                    f"{kind} record needs exactly one marker in the first human turn, found {counts}")
    elif kind == "image" and video_markers:
        return Skip("image_marker_mismatch", rid, "<video> marker on an image record")
    path = None
    if media:
        root = options.images_dir if kind == "image" else options.videos_dir
        if root is None:
            return Skip("missing_file", rid, f"{kind} {media[1]!r} but no --{kind}s directory given")
        path = resolve_media(root, media[1])
        if path is None:
            return Skip("path_escapes_root", rid, f"{media[1]!r} is outside {str(root)!r}")
        if path.is_dir():
            return Skip(f"undecodable_{kind}", rid, f"{str(path)!r} is a directory, not a {kind} file")
        if not path.is_file():
            return Skip("missing_file", rid, f"{str(path)!r} does not exist")
    normalized = [{"from": role, "value": text.replace(templates.VIDEO_MARKER, templates.IMAGE_MARKER)}
                  for role, text in turns]
    return {"index": index, "id": rid, "conversations": json.dumps(normalized, ensure_ascii=False),
            "media": kind, "media_path": media[1] if media else "", "_path": path}


def _encode_frame(img, max_side: int, quality: int) -> bytes:
    from PIL import Image

    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def load_media(example: dict[str, Any], options: BuildOptions) -> dict[str, Any] | Skip:
    """Reads and validates the media of a checked record; returns the full example."""
    from mmlm.data import preprocess

    path: Path | None = example.pop("_path")
    out = dict(example, image=b"", frames=[], frame_times=np.zeros((0,), np.float32))
    if example["media"] == "image":
        try:
            data = path.read_bytes()
            preprocess.decode_image(data, name=str(path))
        except OSError as e:
            if path.is_dir():
                return Skip("undecodable_image", example["id"], f"{path} is a directory, not an image file")
            if not path.is_file():
                return Skip("missing_file", example["id"], str(e))
            return Skip("undecodable_image", example["id"], f"{path}: {e}")
        except Exception as e:  # noqa: BLE001 - any decoder failure means undecodable
            return Skip("undecodable_image", example["id"], f"{path}: {type(e).__name__}: {e}")
        out["image"] = data
    elif example["media"] == "video":
        try:
            video = preprocess.decode_video(path, max_frames=options.max_video_frames,
                                            target_fps=options.video_fps)
        except Exception as e:  # noqa: BLE001 - PyAV raises many error types
            return Skip("undecodable_video", example["id"], f"{path}: {type(e).__name__}: {e}")
        out["frames"] = [_encode_frame(f, options.max_frame_side, options.jpeg_quality) for f in video.frames]
        out["frame_times"] = video.times.astype(np.float32)
    out["media"] = MEDIA_NAMES.index(example["media"])
    return out


def process_record(raw: Any, index: int, options: BuildOptions) -> dict[str, Any] | Skip:
    """check_record, load_media, then (with `options.text`) the text-length class; never raises for a bad record."""
    try:
        checked = check_record(raw, index, options)
        if isinstance(checked, Skip):
            return checked
        out = load_media(checked, options)
    except Exception as e:  # noqa: BLE001 - a record must never stop the build
        return Skip("malformed_record", record_id(raw, index), f"unexpected {type(e).__name__}: {e}")
    if options.text is not None and not isinstance(out, Skip):
        try:  # only counted: a conversation the check cannot encode is still written (and not counted)
            out["_text"] = classify(options.tokenizer, json.loads(out["conversations"]), options.text)
        except Exception:  # noqa: BLE001
            pass
    return out


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class SplitStats:
    written: int = 0
    media: dict[str, int] = dataclasses.field(default_factory=lambda: {m: 0 for m in MEDIA_NAMES})
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    details: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    text: Counts = dataclasses.field(default_factory=Counts)  # conversations the text length cuts

    def add_skip(self, skip: Skip) -> None:
        self.skipped[skip.reason] = self.skipped.get(skip.reason, 0) + 1
        ids = self.examples.setdefault(skip.reason, [])
        if len(ids) < MAX_REPORTED_IDS:
            ids.append(skip.record_id)
            self.details.setdefault(skip.reason, []).append(f"{skip.record_id}: {skip.detail}")


def make_report(stats: Mapping[str, SplitStats]) -> dict[str, Any]:
    """The build_report.json object (totals over splits, then per split)."""
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for s in stats.values():
        for reason, n in s.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
            examples.setdefault(reason, []).extend(s.examples[reason])
    order = {r: i for i, r in enumerate(REASONS)}
    key = lambda r: order.get(r, len(order))  # noqa: E731
    return {
        "written": sum(s.written for s in stats.values()),
        "skipped": {r: skipped[r] for r in sorted(skipped, key=key)},
        "examples": {r: examples[r][:MAX_REPORTED_IDS] for r in sorted(examples, key=key)},
        "splits": {name: {"written": s.written, "media": s.media, "skipped": s.skipped,
                          **({"text": s.text.to_json()} if s.text.checked else {})}
                   for name, s in stats.items()},
    }


def format_summary(report: Mapping[str, Any], stats: Mapping[str, SplitStats] | None = None) -> str:
    """Human-readable build summary."""
    lines = [f"written: {report['written']} examples"]
    text = TextSettings(**report["text_settings"]) if report.get("text_settings") else None
    for name, s in report.get("splits", {}).items():
        media = ", ".join(f"{k} {v}" for k, v in s["media"].items() if v)
        lines.append(f"  split {name}: {s['written']} written ({media or 'empty'}), "
                     f"{sum(s['skipped'].values())} skipped")
        cut = Counts.from_json(s["text"]).summary(f"    split {name}", text) if text and "text" in s else None
        if cut:
            lines.append(cut)
    total = sum(report["skipped"].values())
    lines.append(f"skipped: {total} records" + (":" if total else ""))
    for reason, n in report["skipped"].items():
        lines.append(f"  {reason:<22} {n}")
        if stats:
            for s in stats.values():
                for d in s.details.get(reason, [])[:3]:
                    lines.append(f"      e.g. {d}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# TFDS builder
# ----------------------------------------------------------------------------

def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int,
                 window: int = 256) -> Iterator[Any]:
    """fn over items with a thread pool, results in input order, bounded memory.

    Threads pay off because PIL and PyAV release the GIL while decoding.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: list[concurrent.futures.Future] = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


def _features():
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "index": tfds.features.Scalar(np.int64, doc="position of the record in its source JSON"),
        "id": tfds.features.Text(doc="the record's id"),
        "conversations": tfds.features.Text(doc="JSON list of {from, value} turns, marker <image>"),
        "media": tfds.features.ClassLabel(names=list(MEDIA_NAMES)),
        "media_path": tfds.features.Text(doc="media path as given in the JSON"),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_, doc="original image file bytes, or empty"),
        "frames": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_),
                                         doc="JPEG frames sampled from the video"),
        "frame_times": tfds.features.Sequence(tfds.features.Scalar(np.float32),
                                              doc="timestamp in seconds of each frame"),
    })


def _make_builder(name: str, data_dir: Path, split_inputs: Mapping[str, Iterator[tuple[int, dict]]]):
    """A TFDS GeneratorBasedBuilder over already-validated examples."""
    import tensorflow_datasets as tfds

    class LlavaJsonBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """LLaVA-format instruction data (images, videos, text) as ArrayRecord."""

        VERSION = tfds.core.Version(DATASET_VERSION)
        RELEASE_NOTES = {DATASET_VERSION: "Built by `mmlm data build`."}
        # No dataset source package (checksums, metadata files): this also
        # avoids tfds' code-path lookup, which needs `importlib_resources`.
        code_path = None

        def __init__(self, **kwargs):
            self.name = name  # one class, any dataset name (like tfds' AdhocBuilder)
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="LLaVA-format instruction data built by `mmlm data build`.",
                features=_features(),
                disable_shuffling=True,  # keep the JSON order; grain shuffles at read time
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(gen) for split, gen in split_inputs.items()}

        def _generate_examples(self, gen):
            yield from gen

    return LlavaJsonBuilder(data_dir=str(data_dir), file_format="array_record")


def build_dataset(jsons: Mapping[str, str | os.PathLike] | str | os.PathLike,
                  images_dir: str | os.PathLike | None, out_dir: str | os.PathLike, *,
                  videos_dir: str | os.PathLike | None = None, name: str = "llava_data",
                  overwrite: bool = False, max_video_frames: int = 64, video_fps: float = 1.0,
                  max_frame_side: int = 768, workers: int | None = None,
                  progress: bool = True, text: TextSettings | None = None) -> dict[str, Any]:
    """Builds a TFDS ArrayRecord dataset from LLaVA JSON files.

    Args:
      jsons: {split: JSON path}, or one path (the "train" split).
      images_dir: root of the image paths (None: image records are skipped
        as missing_file).
      out_dir: output directory; gets NAME/1.0.0/..., mmlm_dataset.json and
        build_report.json.
      videos_dir: root of the video paths.
      name: TFDS dataset name (lowercase letters, digits, underscores).
      overwrite: replace an existing build of NAME in out_dir.
      max_video_frames: cap on frames stored per video (pipelines can use fewer).
      video_fps: video sampling rate in frames per second.
      max_frame_side: stored video frames are downscaled to fit this side.
      workers: threads decoding media (default: CPU count, at most 16).
      progress: tqdm progress bars.
      text: count, per split, the conversations these text settings cut (`mmlm.data.supervision`): in
        the report (`splits.SPLIT.text`) and the summary. None: not counted.

    Returns:
      The report dict (also written to out_dir/build_report.json).

    Raises:
      BuildError: bad arguments, unreadable JSON, existing output, or a split
        with no valid record. A failed build removes what it wrote.
    """
    if not isinstance(jsons, Mapping):
        jsons = {"train": jsons}
    if not jsons:
        raise BuildError("no JSON file given")
    if not _NAME_RE.match(name):
        raise BuildError(f"invalid dataset name {name!r}: use lowercase letters, digits and '_', "
                         "starting with a letter")
    for split in jsons:
        if not re.match(r"^[A-Za-z][A-Za-z0-9_]*$", split):
            raise BuildError(f"invalid split name {split!r}: use letters, digits and '_'")
    for flag, d in (("--images", images_dir), ("--videos", videos_dir)):
        if d is not None and not Path(d).is_dir():
            raise BuildError(f"{flag} directory {str(d)!r} does not exist")
    if max_video_frames < 1 or video_fps <= 0 or max_frame_side < 16:
        raise BuildError(f"bad video options: max_video_frames={max_video_frames}, "
                         f"video_fps={video_fps}, max_frame_side={max_frame_side}")
    out = Path(out_dir)
    target = out / name
    _check_outputs(out, name, jsons, images_dir, videos_dir, overwrite)
    options = BuildOptions(Path(images_dir) if images_dir is not None else None,
                           Path(videos_dir) if videos_dir is not None else None,
                           max_video_frames, video_fps, max_frame_side)
    if text is not None:
        from mmlm.data.tokenizer import load_tokenizer

        if text.template not in templates.TEMPLATES:
            raise BuildError(f"unknown template {text.template!r}; choose from {templates.TEMPLATES}")
        if text.max_text_len < 2:
            raise BuildError(f"the text length must be >= 2 tokens, got {text.max_text_len}")
        options.text, options.tokenizer = text, load_tokenizer(text.tokenizer)  # a bad path fails here
    records = {split: read_records(path) for split, path in jsons.items()}
    for split, recs in records.items():
        if not recs:
            raise BuildError(f"split {split!r}: {str(jsons[split])!r} holds no records")
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # Built beside the outputs and swapped in when complete: an earlier build survives a failed or interrupted
    # one, and out/NAME, the report and the manifest always describe the same build.
    replacement = DirectoryReplacement(target)
    stage = out / f".{name}.mmlm-build"
    try:
        new_dir = replacement.__enter__()
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        report = _build(name, stage, jsons, records, options, workers, progress, max_video_frames, video_fps)
        os.rmdir(new_dir)
        os.rename(stage / name, new_dir)
        replacement.commit({stage / REPORT_FILE: out / REPORT_FILE, stage / META_FILE: out / META_FILE})
        return report
    except BaseException:
        # A failed build leaves nothing behind: no half-written dataset, no empty output directory.
        shutil.rmtree(replacement.new, ignore_errors=True)
        if created_out and out.is_dir() and not [p for p in out.iterdir() if p != stage]:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check_outputs(out: Path, name: str, jsons: Mapping[str, Any], images_dir: Any, videos_dir: Any,
                   overwrite: bool) -> None:
    """Refuses outputs that would replace an input, or an earlier build without `overwrite`."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {str(out)!r} exists and is not a directory; give a directory path")
    files = {f"--json {split}": path for split, path in jsons.items()}
    # out/NAME is replaced as a whole: it must not be or hold an input (it may lie inside --images).
    check_not_input(out / name, "--out/--name", {**files, "--images": images_dir, "--videos": videos_dir},
                    inside=False)
    for f in (REPORT_FILE, META_FILE):
        check_not_input(out / f, "--out", files, inside=False, contains=False)
    target = out / name
    if target.exists() and not overwrite:
        raise BuildError(f"{str(target)!r} already exists; pass --overwrite to rebuild it")
    meta = out / META_FILE
    if not overwrite and (meta.exists() or (out / REPORT_FILE).exists()):
        try:
            earlier = f"the dataset {json.loads(meta.read_text(encoding='utf-8'))['name']!r}"
        except (OSError, ValueError, KeyError, TypeError):
            earlier = "an earlier build"
        raise BuildError(f"--out {str(out)!r} already holds {earlier} ({META_FILE}, {REPORT_FILE}); building "
                         f"{name!r} there would replace its report: choose another --out, or pass --overwrite")


def _build(name: str, out: Path, jsons: Mapping[str, Any], records: Mapping[str, list], options: "BuildOptions",
           workers: int | None, progress: bool, max_video_frames: int, video_fps: float) -> dict[str, Any]:
    """The TFDS build proper of `build_dataset` (inputs already checked) into the staging directory `out`:
    out/NAME/VERSION, out/build_report.json and out/mmlm_dataset.json."""
    from tqdm import tqdm

    workers = workers or min(16, os.cpu_count() or 1)
    stats = {split: SplitStats() for split in jsons}

    def generate(split: str) -> Iterator[tuple[int, dict]]:
        recs = records[split]
        results = _ordered_map(lambda item: process_record(item[1], item[0], options),
                               enumerate(recs), workers)
        bar = tqdm(results, total=len(recs), desc=f"build {split}", unit="rec", disable=not progress)
        for result in bar:
            if isinstance(result, Skip):
                stats[split].add_skip(result)
                continue
            stats[split].written += 1
            stats[split].media[MEDIA_NAMES[result["media"]]] += 1
            if "_text" in result:
                stats[split].text.add(result.pop("_text"), result["id"])
            yield result["index"], result
        if stats[split].written == 0:
            raise BuildError(f"split {split!r}: no valid record in {str(jsons[split])!r} "
                             f"(skipped: {stats[split].skipped})")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    builder = _make_builder(name, out, {split: generate(split) for split in jsons})
    with tempfile.TemporaryDirectory() as downloads:
        import tensorflow_datasets as tfds

        if not progress:
            tfds.disable_progress_bar()  # tfds' own bars (splits, shuffling)
        builder.download_and_prepare(
            download_dir=downloads,
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    report = make_report(stats)
    if options.text is not None:
        report["text_settings"] = options.text.to_json()
    write_text_atomic(out / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    meta = {
        "name": name,
        "version": DATASET_VERSION,
        "builder_dir": f"{name}/{DATASET_VERSION}",
        "splits": {split: {"num_examples": s.written, "media": s.media,
                           "source_json": str(Path(jsons[split]).resolve())}
                   for split, s in stats.items()},
        "max_video_frames": max_video_frames,
        "video_fps": video_fps,
    }
    write_text_atomic(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    report["_summary"] = format_summary(report, stats)
    return report


def read_meta(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """The `mmlm_dataset.json` of a build directory (BuildError if absent)."""
    f = Path(dataset_dir) / META_FILE
    if not f.is_file():
        raise BuildError(f"{str(dataset_dir)!r} is not an `mmlm data build` output (no {META_FILE}); "
                         "build it with `mmlm data build --json FILE --images DIR --out DIR`")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
        ok = (isinstance(meta, dict) and isinstance(meta.get("splits"), dict) and isinstance(meta.get("builder_dir"), str)
              and all(isinstance(s, dict) for s in meta["splits"].values()))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise BuildError(f"{f} is damaged: not valid JSON ({type(e).__name__}: {e}); rebuild the dataset with "
                         "`mmlm data build ... --overwrite`") from None
    if not ok:
        raise BuildError(f"{f} is damaged: expected an object with 'splits' and 'builder_dir'; rebuild the "
                         "dataset with `mmlm data build ... --overwrite`")
    return meta


def parse_json_args(values: Sequence[str], default_split: str = "train") -> dict[str, str]:
    """`--json` values (`PATH` or `SPLIT=PATH`, repeatable) -> {split: path}."""
    out: dict[str, str] = {}
    for v in values:
        split, sep, path = v.partition("=")
        if not sep or os.path.exists(v):
            split, path = default_split, v
        if split in out:
            raise BuildError(f"split {split!r} given twice (--json {v!r}); use SPLIT=PATH for each split")
        out[split] = path
    return out
