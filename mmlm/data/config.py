"""The `config.data` ConfigDict read by `mmlm.data.pipeline.make_dataset`.

Training configs do `config.data = default_data_config()` and override
fields. Defaults are the paper's stage-2 settings (LLaVA-Mini, Vicuna v1.5,
336 px); the tiny/demo configs override sizes.

Fields the pipeline may take from the model config: `image_size` and
`hd_grid` default to None, meaning "use `config.model.image_size` /
`config.model.hd_grid`" (336 / 1 when the config has no such field), so the
model and the data cannot disagree by accident. Set them here to override.

`hd_grid` has one convention everywhere (model, data, inference, bench):
n >= 2 is LLaVA-Mini-HD's n x n grid of crops plus the whole image, and 1
means no HD (a 1 x 1 grid is the whole image). Configs written before this
convention used 0 for "no HD" in `config.data`; `hd_grid_value` reads that 0
as 1, so their saved config.json files keep loading.

`DataConfig.from_config` is the typed, validated section (the data package
owns its checks); `check_synthetic_section` checks `config.synthetic`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from mmlm.config_utils import MAX_SEED, ConfigError, check_number, section_with_defaults, typed_fields
from mmlm.pixels import CLIP_MEAN, CLIP_STD, check_mean_std
from mmlm.errors import UserError
from mmlm.data.tokenizer import TINY_TOKENIZER_PATH


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults for `config.data`; every field has a comment with meaning and units."""
    c = ml_collections.ConfigDict()
    # Output directory of `mmlm data build` (holds mmlm_dataset.json).
    c.dataset_dir = ""
    # Split names used by the trainer for training and evaluation.
    c.train_split = "train"
    c.eval_split = "val"
    # Conversation template: "vicuna_v1", "llama_3_1" or "plain" (stage 1).
    c.template = "vicuna_v1"
    # System prompt replacing the template's default; None keeps the default.
    c.system_prompt = None
    # Tokenizer: a sentencepiece .model, a tokenizer.json, or a directory
    # with one of them. Default: the tiny tokenizer shipped in data/.
    c.tokenizer = str(TINY_TOKENIZER_PATH)
    # Text length T of input_ids/labels (tokens, including the one image
    # placeholder); longer conversations are truncated (placeholder kept).
    c.max_text_len = 2048
    # Text lengths (tokens, ascending) a batch may be cut to: each batch keeps the smallest one that
    # holds its longest conversation (max_text_len when none does), so max_text_len is a maximum, not
    # the cost of every batch. Each length is one more compiled train step. () = every batch is
    # max_text_len long.
    c.length_buckets = ()
    # Global batch size (examples per step over all hosts); each process gets
    # batch_size / process_count.
    c.batch_size = 256
    # Global batch size for evaluation; 0 means batch_size.
    c.eval_batch_size = 0
    # Image side H = W in pixels; None: config.model.image_size (else 336).
    c.image_size = None
    # HD grid n (n x n crops + the whole image, K = n*n + 1 views); 1 = no HD
    # (K = 1), as model.hd_grid; None: config.model.hd_grid (else 1).
    c.hd_grid = None
    # Frames F per video sample (cap after 1 fps sampling); batches of a
    # dataset with videos have F = max_frames, image-only datasets F = 1.
    c.max_frames = 8
    # Frame counts (ascending) a batch may be cut to along F: each batch keeps the smallest one that holds its
    # sample with the most real frames (max_frames when none does), so a batch of images costs 1 frame, not
    # max_frames. Real frames are a prefix of each sample's F slots, so only unreal (masked) frames go. Each
    # frame count is one more compiled train step. () = every batch has max_frames frames.
    c.frame_buckets = ()
    # Video sampling rate in frames per second (LLaVA-Mini: 1 fps). Used to
    # re-sample the frames stored by `mmlm data build` (also at 1 fps by default).
    c.video_fps = 1.0
    # Inference on videos (`mmlm chat --video`, `mmlm eval`, `mmlm.infer.chunked`): frames are decoded as a
    # stream and the vision tower, compressor and pre-fusion run over chunks of this many frames (one compiled
    # program per chunk size; the last chunk is padded and masked), so memory grows with the LLM's cache (m
    # tokens per frame), not with the video's pixels or patch features.
    c.video_chunk_frames = 16
    # Inference: the LLM prefill runs over the prompt in chunks of this many tokens (each attends to the
    # cache so far), so its attention scores hold chunk x prompt values instead of prompt x prompt.
    c.prefill_chunk_tokens = 512
    # CLIP normalisation mean and std (RGB, on 0..1 pixels); the mean is also
    # the padding colour of the pad-to-square step. Training configs built by
    # `mmlm.config_defaults.add_training` make these references to
    # model.image_mean / model.image_std (the model normalises uint8 pixels).
    c.image_mean = tuple(CLIP_MEAN)
    c.image_std = tuple(CLIP_STD)
    # True: batches carry `images` as uint8 pixels (0..255, 1 byte per value, 4x fewer bytes to the device
    # than float32) and the model normalises them on device with model.image_mean / model.image_std;
    # False: the host normalises to float32 `images` with image_mean / image_std. Unreal frames are zeros
    # either way (uint8 0, or 0.0 after normalisation); the model sees the same values.
    c.pixels_on_device = True
    # Seed of the shuffle (each epoch is shuffled differently, deterministically).
    c.seed = 0
    # Shuffle training data (evaluation data is never shuffled).
    c.shuffle = True
    # Training epochs; None repeats forever (the trainer stops by step count).
    c.num_epochs = None
    # Worker processes per host for decoding/preprocessing (grain mp_prefetch);
    # 0 keeps everything in the training process. Changing it changes the
    # order of examples within batches, so keep it fixed across a resume.
    c.worker_count = 0
    # Batches each worker process prepares ahead.
    c.worker_buffer_size = 2
    # Threads per process that read and preprocess examples (PIL and PyAV
    # release the GIL, so threads help even without worker processes).
    c.read_threads = 4
    # Examples read ahead per process (grain ReadOptions.prefetch_buffer_size).
    c.prefetch_buffer_size = 64
    # Keep every processed training example (token ids, masks, uint8 pixels) in host memory after its
    # first read, so later epochs skip reading, JSON, tokenizing and image decoding. For small datasets
    # trained for many epochs (the demo: 12,000 examples, ~90 MB, ~10 epochs); the examples are a pure
    # function of the record, so batches are identical either way.
    c.cache_examples = False
    # Also emit `truncated` (bool, B) and `num_tokens` (int32, B: length
    # before truncation) in each batch, for logging truncation.
    c.with_stats = False
    return c


def hd_grid_value(value: Any, key: str = "data.hd_grid") -> int:
    """`hd_grid` in the one convention (1 = no HD, n >= 2 = n x n crops + the whole image).

    0, how `config.data` spelled "no HD" in configs saved before the
    conventions were unified, is read as 1. Anything else that is not an
    integer >= 1 is a `UserError` naming `key`.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise UserError(f"{key}={value!r} is not a valid HD grid: use an integer n >= 1 "
                        "(1 = no HD, n >= 2 = n x n crops plus the whole image)")
    return max(int(value), 1)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The typed `config.data`: one field per key of `default_data_config` (meanings and units there).

    Built by `from_config`, which checks every field; the buckets are sorted.
    """

    dataset_dir: str
    train_split: str
    eval_split: str
    template: str
    system_prompt: str | None
    tokenizer: str
    max_text_len: int
    length_buckets: tuple[int, ...]
    batch_size: int
    eval_batch_size: int
    image_size: int | None
    hd_grid: int | None
    max_frames: int
    frame_buckets: tuple[int, ...]
    video_fps: float
    video_chunk_frames: int
    prefill_chunk_tokens: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    pixels_on_device: bool
    seed: int
    shuffle: bool
    num_epochs: int | None
    worker_count: int
    worker_buffer_size: int
    read_threads: int
    prefetch_buffer_size: int
    cache_examples: bool
    with_stats: bool

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict) -> "DataConfig":
        """Checks `config.data` (fields it lacks take their defaults); a `ConfigError` names the key.

        What depends on other sections (the batch against processes, gradient
        accumulation and the mesh; the pixel constants against the model's) is
        checked by `mmlm.train.config.validate_config`.
        """
        d = section_with_defaults(section, default_data_config())
        w = "config.data"
        check_number(d, "batch_size", where=w, low=1)
        check_number(d, "eval_batch_size", where=w, low=0, hint="0 means data.batch_size")
        check_number(d, "max_text_len", where=w, low=2)
        check_number(d, "max_frames", where=w, low=1)
        check_number(d, "video_fps", where=w, kind=float, low=0, low_open=True)
        check_number(d, "seed", where=w, low=0, high=MAX_SEED)
        if d.num_epochs is not None:
            check_number(d, "num_epochs", where=w, low=1, hint="None repeats forever")
        for key in ("worker_buffer_size", "video_chunk_frames", "prefill_chunk_tokens", "read_threads"):
            check_number(d, key, where=w, low=1)
        for key in ("worker_count", "prefetch_buffer_size"):
            check_number(d, key, where=w, low=0)
        if d.image_size is not None:
            check_number(d, "image_size", where=w, low=1)
        if d.hd_grid is not None:
            check_number(d, "hd_grid", where=w, low=0)
        try:
            check_mean_std(d.image_mean, d.image_std, w)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        from mmlm.data.pipeline import frame_buckets, length_buckets, pixels_on_device  # it imports this module
        from mmlm.data.templates import TEMPLATES

        fields = typed_fields(cls, d)
        # UserErrors naming the key
        fields.update(length_buckets=length_buckets(d), frame_buckets=frame_buckets(d),
                      pixels_on_device=pixels_on_device(d))
        if d.template not in TEMPLATES:
            raise ConfigError(f"config.data.template={d.template!r} is not a template; choose one of {list(TEMPLATES)}")
        fields.update(image_mean=tuple(map(float, d.image_mean)), image_std=tuple(map(float, d.image_std)))
        return cls(**fields)


def check_synthetic_section(section: ml_collections.ConfigDict) -> None:
    """`config.synthetic` (a dataset rendered on first use, `mmlm.data.synth`): sizes and seed."""
    w = "config.synthetic"
    for key in ("num_train", "num_eval", "questions_per_image"):
        check_number(section, key, where=w, low=1)
    check_number(section, "seed", where=w, low=0, high=MAX_SEED)
    check_number(section, "image_size", where=w, low=0, hint="0 means the synthesiser's default")
