"""grain input pipeline: built dataset -> fixed-shape batches for the trainer.

    pipe = make_dataset(config, "train", process_index=jax.process_index(),
                        process_count=jax.process_count(), train=True)
    it = iter(pipe)              # a grain.DatasetIterator
    batch = next(it)             # dict of numpy arrays, see below
    state = it.get_state()       # JSON-able dict; it.set_state(state) resumes

Batch (B = local batch = global batch / process_count, T = max_text_len,
F frames, K views, H = W = image size):

  input_ids      int32   (B, T)  right-padded with the tokenizer's pad id;
                                  one IMAGE_TOKEN_ID (-200) per sample with media
  labels         int32   (B, T)  IGNORE_INDEX (-100) except answer tokens and
                                  the end-of-turn token after each; not shifted
  attention_mask bool    (B, T)  True on real tokens
  images         uint8   (B, F, K, H, W, 3)  pixels 0..255 (data.pixels_on_device, the default; the
                                  model normalises them), or float32 CLIP-normalised on the host
                                  (pixels_on_device False); zeros on frames that are not real
  frame_mask     bool    (B, F)  True on real frames, a prefix of the F slots
  example_id     int32   (B,)    record index in the source JSON; -1 = padding
  (with config.data.with_stats: truncated bool (B,), num_tokens int32 (B,))

F = config.data.max_frames if any split of the dataset has videos, else 1.
K = hd_grid**2 + 1 with HD, else 1.

Order and sharding. Training: the records are shuffled with `seed` (a new
permutation each epoch), repeated `num_epochs` times (None: forever) and the
stream is cut to whole global batches; process p takes stream elements
p, p + P, p + 2P, ..., so global batch s is exactly stream elements
[s G, (s + 1) G) whatever the process count (G global batch, P processes).
Evaluation: no shuffle, one epoch, padded with dummy examples (example_id -1,
all masks False) to a multiple of G, so every process yields the same number
of full batches and the shards are disjoint and cover the split.

Parallelism: `read_threads` threads per process decode and preprocess
examples (PIL/PyAV release the GIL); with `worker_count > 0`, grain worker
processes each run the pipeline on a slice and batch it (the example order
within batches then depends on worker_count: keep it fixed across resumes).

Checkpointing (the trainer, with Orbax):

    import grain, orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(dir, item_names=("state", "data"))
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(it)))
    ...
    it = iter(make_dataset(...same config and process layout...))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(it)))   # `it` now resumes

`grain.checkpoint.CheckpointHandler` writes one `process_I-of-N.json` per
process (the JSON of `it.get_state()`), so each host restores its own
position. Without Orbax: save `json.dumps(it.get_state())`, later call
`it.set_state(json.loads(...))` on a fresh iterator. The resumed iterator
yields exactly the batches an uninterrupted run would, provided the dataset,
the data config and the process count are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import ml_collections
import numpy as np

from mmlm import IGNORE_INDEX
from mmlm.data import build as build_lib
from mmlm.data import preprocess, templates
from mmlm.data.tokenizer import Tokenizer, load_tokenizer
from mmlm.data.config import hd_grid_value
from mmlm.errors import UserError

class DataError(UserError, ValueError):
    """A dataset or data setting the pipeline cannot use (a user mistake: exit status 2 at the CLIs)."""


_PADDING = {"_padding": True}  # stands for a dummy evaluation example


# ----------------------------------------------------------------------------
# Dataset access
# ----------------------------------------------------------------------------

def open_split(dataset_dir: str | Path, split: str):
    """Random-access source of a built split (TFDS ArrayRecord, no TensorFlow needed).

    Items are dicts: index (int), id (bytes), conversations (bytes, JSON),
    media (0 none, 1 image, 2 video), media_path, image (bytes), frames
    (sequence of JPEG bytes), frame_times (float32 seconds).
    """
    import tensorflow_datasets as tfds

    meta = build_lib.read_meta(dataset_dir)
    if split not in meta["splits"]:
        raise DataError(f"dataset {str(dataset_dir)!r} has no split {split!r}; "
                         f"splits: {sorted(meta['splits'])}")
    builder = tfds.builder_from_directory(str(Path(dataset_dir) / meta["builder_dir"]))
    return builder.as_data_source(split)


def record_ids(dataset_dir: str | Path, split: str) -> dict[int, str]:
    """example_id -> record "id" of a built split (for evaluation bookkeeping)."""
    source = open_split(dataset_dir, split)
    out = {}
    for i in range(len(source)):
        rec = source[i]
        out[int(rec["index"])] = record_text(rec["id"])
    return out


def record_text(value: Any) -> str:
    """A text field of a dataset record (stored as bytes) as a str."""
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


class _PaddedSource:
    """A random-access source extended with dummy records up to `length`."""

    def __init__(self, source, length: int):
        self._source = source
        self._n = len(source)
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        if index >= self._length or index < -self._length:
            raise IndexError(index)
        index %= self._length
        return self._source[index] if index < self._n else _PADDING

    def __repr__(self) -> str:
        return f"_PaddedSource({self._source!r}, length={self._length})"


class _CachedExamples:
    """Random-access source of processed examples, each processed on its first read and kept in memory.

    grain's MapDataset has no cache transform; this is the source-level one. Readers may race on a
    miss: both compute the same example (a pure function of the record) and one copy is kept.
    """

    def __init__(self, source, processor: ExampleProcessor):
        self._source = source
        self._processor = processor
        self._examples: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index) % len(self._source)
        example = self._examples.get(index)
        if example is None:
            example = self._processor(self._source[index])
            for value in example.values():
                value.flags.writeable = False  # shared across epochs: the collator copies, never writes
            self._examples[index] = example
        return example

    def __repr__(self) -> str:
        return f"_CachedExamples({self._source!r})"


# ----------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BatchGeometry:
    """Per-example array sizes."""

    max_text_len: int  # T
    num_frames: int  # F
    num_views: int  # K
    image_size: int  # H = W
    hd_grid: int


def _config_value(config: ml_collections.ConfigDict, field: str, default: int) -> int:
    """config.data.FIELD, else config.model.FIELD, else `default`."""
    value = config.data.get(field)
    if value is None and "model" in config:
        value = config.model.get(field)
    return default if value is None else int(value)


def batch_geometry(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> BatchGeometry:
    """T, F, K, H of the batches of a built dataset (`meta` = mmlm_dataset.json)."""
    cfg = config.data
    has_video = any(s["media"].get("video", 0) for s in meta["splits"].values())
    hd_grid = hd_grid_value(_config_value(config, "hd_grid", 1), "config.data.hd_grid")
    geometry = BatchGeometry(
        max_text_len=int(cfg.max_text_len),
        num_frames=int(cfg.max_frames) if has_video else 1,
        num_views=preprocess.num_views(hd_grid),
        image_size=_config_value(config, "image_size", 336),
        hd_grid=hd_grid,
    )
    if geometry.max_text_len < 2 or geometry.num_frames < 1 or geometry.image_size < 1:
        raise ValueError(f"bad data config: max_text_len={cfg.max_text_len}, "
                         f"max_frames={cfg.max_frames}, image_size={geometry.image_size}")
    return geometry


def pixels_on_device(cfg: ml_collections.ConfigDict) -> bool:
    """`data.pixels_on_device` (True when absent, e.g. a config saved before the key existed), validated."""
    value = cfg.get("pixels_on_device", True)
    if not isinstance(value, bool):
        raise UserError(f"data.pixels_on_device={value!r}: use True (uint8 pixels, normalised by the model) "
                        "or False (float32, normalised on the host)")
    return value


def images_dtype(cfg: ml_collections.ConfigDict) -> np.dtype:
    """dtype of batch `images` under `config.data`: uint8 with pixels_on_device, else float32."""
    return np.dtype(np.uint8) if pixels_on_device(cfg) else np.dtype(np.float32)


def batch_spec(config: ml_collections.ConfigDict, batch_size: int,
               geometry: BatchGeometry) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of a batch of `batch_size` examples."""
    b, g = batch_size, geometry
    spec = {
        "input_ids": ((b, g.max_text_len), np.dtype(np.int32)),
        "labels": ((b, g.max_text_len), np.dtype(np.int32)),
        "attention_mask": ((b, g.max_text_len), np.dtype(bool)),
        "fuse_mask": ((b, g.max_text_len), np.dtype(bool)),
        "images": ((b, g.num_frames, g.num_views, g.image_size, g.image_size, 3), images_dtype(config.data)),
        "frame_mask": ((b, g.num_frames), np.dtype(bool)),
        "example_id": ((b,), np.dtype(np.int32)),
    }
    if config.data.with_stats:
        spec["truncated"] = ((b,), np.dtype(bool))
        spec["num_tokens"] = ((b,), np.dtype(np.int32))
    return spec


# ----------------------------------------------------------------------------
# Per-example processing
# ----------------------------------------------------------------------------

class ExampleProcessor:
    """Stored record -> fixed-shape example arrays (a grain map function).

    Examples carry `pixels`, uint8 (F, K, H, W, 3) views after pad-to-square
    and resize; `Collator` stacks them into `images` (uint8, or normalised to
    float32 in one vectorised pass per batch; 4x less memory in prefetch
    buffers either way). Real frames fill slots 0, 1, ... (`frame_mask` is a
    prefix), which `cut_frames` relies on.
    Picklable: the tokenizer is opened lazily in each worker process.
    """

    def __init__(self, *, tokenizer: str, template: str, system_prompt: str | None,
                 geometry: BatchGeometry, mean, video_fps: float, stored_video_fps: float,
                 with_stats: bool):
        if template not in templates.TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose from {templates.TEMPLATES}")
        self.tokenizer_path = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.geometry = geometry
        self.mean = tuple(float(m) for m in mean)  # padding colour of pad-to-square
        self.video_fps = float(video_fps)
        self.stored_video_fps = float(stored_video_fps)
        self.with_stats = with_stats
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_tokenizer"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tokenizer = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def empty(self) -> dict[str, np.ndarray]:
        """A padding example: pad ids, no labels, no attention, no frames, id -1."""
        g = self.geometry
        out = {
            "input_ids": np.full((g.max_text_len,), self.tokenizer.pad_id, np.int32),
            "labels": np.full((g.max_text_len,), IGNORE_INDEX, np.int32),
            "attention_mask": np.zeros((g.max_text_len,), bool),
            "fuse_mask": np.zeros((g.max_text_len,), bool),
            "pixels": np.zeros((g.num_frames, g.num_views, g.image_size, g.image_size, 3), np.uint8),
            "frame_mask": np.zeros((g.num_frames,), bool),
            "example_id": np.asarray(-1, np.int32),
        }
        if self.with_stats:
            out["truncated"] = np.asarray(False)
            out["num_tokens"] = np.asarray(0, np.int32)
        return out

    def video_frame_slots(self, num_stored: int) -> np.ndarray:
        """Which stored frames to use: re-sampled to `video_fps`, capped at F."""
        wanted = round(num_stored * self.video_fps / self.stored_video_fps)
        return preprocess.subsample_uniform(num_stored, max(1, min(self.geometry.num_frames, wanted)))

    def _views(self, encoded: bytes, out: np.ndarray) -> None:
        """Decodes an image and writes its K uint8 views into `out` (K, H, W, 3)."""
        g = self.geometry
        views = preprocess.image_views(preprocess.decode_image(encoded), g.image_size, g.hd_grid, self.mean)
        for k, view in enumerate(views):
            out[k] = np.asarray(view, np.uint8)

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = self.empty()
        if record.get("_padding"):
            return out
        conversations = json.loads(record_text(record["conversations"]))
        enc = templates.encode_conversation(self.tokenizer, conversations, self.template,
                                            self.geometry.max_text_len, system=self.system_prompt)
        n = len(enc["input_ids"])
        out["input_ids"][:n] = enc["input_ids"]
        out["labels"][:n] = enc["labels"]
        out["attention_mask"][:n] = True
        out["fuse_mask"][:n] = enc["fuse_mask"]
        out["example_id"] = np.asarray(int(record["index"]), np.int32)
        if self.with_stats:
            out["truncated"] = np.asarray(enc["truncated"])
            out["num_tokens"] = np.asarray(enc["num_tokens"], np.int32)
        media = build_lib.MEDIA_NAMES[int(record["media"])]
        if media == "image":
            self._views(record["image"], out["pixels"][0])
            out["frame_mask"][0] = True
        elif media == "video":
            frames = list(record["frames"])
            for slot, i in enumerate(self.video_frame_slots(len(frames))):
                self._views(frames[int(i)], out["pixels"][slot])
                out["frame_mask"][slot] = True
        if media != "none" and enc["image_pos"] < 0:
            raise ValueError(f"record {record_text(record['id'])!r} has {media} but no placeholder "
                             f"under template {self.template!r}")
        return out


TEXT_KEYS = ("input_ids", "labels", "attention_mask", "fuse_mask")  # (B, T) arrays, right padded


def bucket_length(longest: int, buckets: Sequence[int], max_len: int) -> int:
    """The smallest bucket >= `longest` tokens; `max_len` when none is (or there are no buckets)."""
    return min([int(b) for b in buckets if longest <= int(b) < max_len] + [max_len])


def longest_text(batch: Mapping[str, np.ndarray]) -> int:
    """Tokens of the batch's longest conversation (rows are right padded)."""
    return int(np.asarray(batch["attention_mask"]).sum(axis=1).max(initial=0))


def cut_text(batch: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """The batch with its (B, T) text arrays cut to `length` tokens (>= `longest_text`: only padding goes)."""
    if length < longest_text(batch):
        raise ValueError(f"cutting text to {length} tokens would drop tokens of a {longest_text(batch)}-token row")
    return {k: (v[:, :length] if k in TEXT_KEYS else v) for k, v in batch.items()}


def _positive_ints(cfg: ml_collections.ConfigDict, key: str, what: str, example: str) -> tuple[int, ...]:
    """`data.<key>`: a tuple of positive integers, sorted; anything else is a `UserError`."""
    buckets = tuple(cfg.get(key) or ())
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
        raise UserError(f"data.{key}={buckets!r}: use positive {what}, e.g. {example}")
    return tuple(sorted(buckets))


def length_buckets(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """`data.length_buckets`, validated and sorted."""
    return _positive_ints(cfg, "length_buckets", "token counts", "(256, 512, 1024)")


FRAME_KEYS = ("images", "frame_mask")  # (B, F, ...) arrays; real frames are a prefix of the F slots


def frame_buckets(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """`data.frame_buckets`, validated and sorted."""
    return _positive_ints(cfg, "frame_buckets", "frame counts", "(1, 8, 16, 32)")


def most_frames(batch: Mapping[str, np.ndarray]) -> int:
    """Frame slots the batch uses: 1 + the last slot that is real in any row (0 when none is).

    Real frames are a prefix of each row's slots, so this is the real-frame
    count of the batch's sample with the most.
    """
    used = np.nonzero(np.asarray(batch["frame_mask"]).any(axis=0))[0]
    return int(used[-1]) + 1 if used.size else 0


def cut_frames(batch: Mapping[str, np.ndarray], frames: int) -> dict[str, np.ndarray]:
    """The batch with `images` (B, F, K, H, W, 3) and `frame_mask` (B, F) cut to `frames` slots.

    Only slots whose frame_mask is False in every row may go: a real frame at
    or past `frames` is a ValueError.
    """
    if frames < 1:
        raise ValueError(f"cannot cut a batch to {frames} frames (at least 1)")
    if np.asarray(batch["frame_mask"])[:, frames:].any():
        raise ValueError(f"cutting to {frames} frames would drop real frames (the batch uses "
                         f"{most_frames(batch)} slots)")
    return {k: (v[:, :frames] if k in FRAME_KEYS else v) for k, v in batch.items()}


class Collator:
    """Batch function: stacks examples; uint8 `pixels` -> `images`.

    `images` are the uint8 pixels themselves with `on_device` (the model
    normalises them), else CLIP-normalised float32. Frames that are not real
    (frame_mask False) are zeros in `images` either way.
    """

    def __init__(self, mean, std, on_device: bool = False):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.on_device = bool(on_device)

    def __call__(self, examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "pixels"}
        pixels = np.stack([e["pixels"] for e in examples])
        images = pixels if self.on_device else preprocess.normalize(pixels, self.mean, self.std)
        images[~batch["frame_mask"]] = 0
        out = {"input_ids": batch.pop("input_ids"), "labels": batch.pop("labels"),
               "attention_mask": batch.pop("attention_mask"), "fuse_mask": batch.pop("fuse_mask"),
               "images": images}
        out.update(batch)
        return out


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------

def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside `absl.app` nobody parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass
class DataPipeline:
    """A grain pipeline over one split; `iter()` gives a checkpointable iterator.

    Attributes:
      dataset: the grain IterDataset yielding batches.
      split, train: what it reads and how.
      num_examples: records in the split.
      global_batch_size, local_batch_size: examples per step overall / here.
      batches_per_epoch: steps per pass over the split (train: whole batches
        only; eval: including the padded last batch).
      num_batches: batches this iterator yields (None when repeating forever).
      geometry: T, F, K, H of the examples.
      spec: {name: (shape, dtype)} of each batch.
    """

    dataset: Any
    split: str
    train: bool
    num_examples: int
    global_batch_size: int
    local_batch_size: int
    batches_per_epoch: int
    num_batches: int | None
    geometry: BatchGeometry
    spec: dict[str, tuple[tuple[int, ...], np.dtype]]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.dataset)


def make_processor(config: ml_collections.ConfigDict, meta: Mapping[str, Any],
                   geometry: BatchGeometry, *, with_stats: bool | None = None) -> ExampleProcessor:
    """The `ExampleProcessor` of `config.data` for a built dataset."""
    cfg = config.data
    return ExampleProcessor(
        tokenizer=str(cfg.tokenizer), template=str(cfg.template), system_prompt=cfg.system_prompt,
        geometry=geometry, mean=cfg.image_mean, video_fps=float(cfg.video_fps),
        stored_video_fps=float(meta.get("video_fps", 1.0)),
        with_stats=bool(cfg.with_stats) if with_stats is None else with_stats)


def make_dataset(config: ml_collections.ConfigDict, split: str, *, process_index: int,
                 process_count: int, train: bool) -> DataPipeline:
    """The input pipeline of `split` for one process.

    Args:
      config: the experiment config; reads `config.data` (see
        `mmlm.data.config.default_data_config`) and, where `config.data`
        leaves them None, `config.model.image_size` / `config.model.hd_grid`.
      split: a split of the dataset in `config.data.dataset_dir`.
      process_index, process_count: this host and the number of hosts
        (`jax.process_index()`, `jax.process_count()`).
      train: shuffle/repeat and drop incomplete batches (True), or one
        ordered, padded pass for evaluation (False).

    Returns:
      A `DataPipeline`; `iter(pipeline)` yields batch dicts (module docstring)
      and supports `get_state()` / `set_state()`.
    """
    import grain

    cfg = config.data
    if not cfg.dataset_dir:
        raise DataError("config.data.dataset_dir is empty; set it to an `mmlm data build --out` directory")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    meta = build_lib.read_meta(cfg.dataset_dir)
    geometry = batch_geometry(config, meta)
    global_bs = int(cfg.batch_size if train else (cfg.eval_batch_size or cfg.batch_size))
    if global_bs < 1 or global_bs % process_count:
        raise ValueError(f"global batch size {global_bs} must be a positive multiple of "
                         f"process_count {process_count}")
    local_bs = global_bs // process_count
    source = open_split(cfg.dataset_dir, split)
    n = len(source)

    processor = make_processor(config, meta, geometry)
    load_tokenizer(processor.tokenizer_path)  # fail now, not in a worker, on a bad path
    cached = bool(cfg.get("cache_examples", False)) and train
    if train:
        if n < global_bs:
            raise DataError(f"split {split!r} of {str(cfg.dataset_dir)!r} has {n} examples, fewer than one global "
                            f"batch (config.data.batch_size={global_bs}); lower the batch size or add data")
        ds = grain.MapDataset.source(_CachedExamples(source, processor) if cached else source)
        if cfg.shuffle:
            ds = ds.shuffle(seed=int(cfg.seed))
        epochs = cfg.num_epochs
        if epochs is not None and int(epochs) < 1:
            raise DataError(f"config.data.num_epochs must be >= 1 or None, got {epochs}")
        ds = ds.repeat(None if epochs is None else int(epochs))
        batches_per_epoch = n // global_bs
        if epochs is None:
            num_batches = None
        else:
            num_batches = (n * int(epochs)) // global_bs
            ds = ds[: num_batches * global_bs]  # whole global batches only
    else:
        batches_per_epoch = math.ceil(n / global_bs)
        num_batches = batches_per_epoch
        ds = grain.MapDataset.source(_PaddedSource(source, num_batches * global_bs))
    # Interleaved shards: global batch s = stream elements [s G, (s + 1) G).
    ds = ds[process_index::process_count]
    if not cached:
        ds = ds.map(processor)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(cfg.read_threads),
                                                 prefetch_buffer_size=int(cfg.prefetch_buffer_size)))
    collate = Collator(cfg.image_mean, cfg.image_std, on_device=pixels_on_device(cfg))
    it_ds = it_ds.batch(local_bs, drop_remainder=train, batch_fn=collate)
    if int(cfg.worker_count) > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(cfg.worker_count), per_worker_buffer_size=int(cfg.worker_buffer_size)))
    return DataPipeline(
        dataset=it_ds, split=split, train=train, num_examples=n, global_batch_size=global_bs,
        local_batch_size=local_bs, batches_per_epoch=batches_per_epoch,
        num_batches=(None if num_batches is None else num_batches),
        geometry=geometry, spec=batch_spec(config, local_bs, geometry))
