"""Input side of the trainer: synthetic data on first use, iterators, global batches.

* `prepare_synthetic(config, workdir)`: when `config.synthetic.kind` is set
  and `config.data.dataset_dir` holds no built dataset, process 0 renders
  the synthetic splits (`mmlm.data.synth`) and builds them
  (`mmlm.data.build`) under `synthetic.cache_dir` (default `WORKDIR/data`);
  the other processes wait for it. The demo uses this.
* `make_pipeline(config, split, train=...)`: this host's shard of a split
  (grain, checkpointable; `local_only` reads the whole split on one host).
* `global_batch(...)`: host-local numpy batches -> global `jax.Array`s split
  over the mesh's batch axes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mmlm.data.config import hd_grid_value
from mmlm.data.supervision import Counts, TextSettings, classify
from mmlm.errors import UserError
from mmlm.safe_io import write_text_atomic
from mmlm.sharding import batch_sharding

log = logging.getLogger(__name__)

SYNTH_DONE = "synthetic_build.json"  # marker written last: the build is complete
CATEGORIES_FILE = "eval_categories.json"  # {example_id: category of its first question} of the eval split


def synthetic_config() -> ml_collections.ConfigDict:
    """`config.synthetic`: a dataset rendered and built on first use (empty kind = off)."""
    return ml_collections.ConfigDict(dict(
        kind="",                 # "shapes", "shapes_hd", "moving_shapes", "grid_shapes" or "grid_shapes_hd" (mmlm.data.synth); "" = off
        num_train=2000,          # records (images / videos) in the train split
        num_eval=200,            # records in the eval split (config.data.eval_split)
        seed=0,                  # synthesis seed (records are a pure function of seed, split, index)
        image_size=0,            # rendered side in pixels; 0 = the synthesiser's default
        questions_per_image=1,   # question/answer turns per record
        train_category_weights="",  # train split's question mix, "color=3,count=0.5" (unlisted: 1; "" = uniform).
                                    # The eval split always draws categories uniformly.
        cache_dir="",            # where to build; "" = WORKDIR/data. Reused when already built.
    ))


def _synth_key(config: ml_collections.ConfigDict) -> dict[str, Any]:
    from mmlm.data import synth

    s = config.synthetic
    return {"version": synth.DATA_VERSION, "kind": s.kind, "num_train": int(s.num_train), "num_eval": int(s.num_eval), "seed": int(s.seed),
            "image_size": int(s.image_size), "questions_per_image": int(s.questions_per_image),
            "train_category_weights": synth_weights(config),
            "train_split": config.data.train_split, "eval_split": config.data.eval_split}


def synth_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The train split's category weights, validated against the synthetic kind."""
    from mmlm.data import synth

    s = config.synthetic
    weights = synth.parse_category_weights(s.get("train_category_weights", ""))
    synth.category_probabilities(s.kind, weights)
    return weights


def prepare_synthetic(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Builds the synthetic dataset if needed and points `config.data.dataset_dir` at it.

    A build is reused when its marker records the same synthesis settings,
    so a restarted run (or a second run with the same cache_dir) skips it.
    """
    if "synthetic" not in config or not config.synthetic.kind:
        return
    root = Path(config.synthetic.cache_dir or os.path.join(workdir, "data")).absolute()
    key = _synth_key(config)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    out = root / f"{key['kind']}_{key['num_train']}_{key['num_eval']}_{digest}"  # one directory per setting
    marker = out / SYNTH_DONE
    if jax.process_index() == 0:
        root.mkdir(parents=True, exist_ok=True)
        # Two runs sharing a cache_dir (e.g. started together) must not build into the same directory at once.
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (marker.is_file() and json.loads(marker.read_text()) == key):
                _build_synthetic(config, key, out)
                write_text_atomic(marker, json.dumps(key, indent=2) + "\n")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("mmlm_synthetic_data_ready")
    if not marker.is_file():
        raise FileNotFoundError(f"synthetic dataset {str(out)!r} is not visible from process "
                                f"{jax.process_index()}: put synthetic.cache_dir on a shared filesystem")
    config.data.dataset_dir = str(out / "built")
    if "eval" in config and not config.eval.get("categories_file"):
        config.eval.categories_file = str(out / CATEGORIES_FILE)


def _build_synthetic(config: ml_collections.ConfigDict, key: Mapping[str, Any], out: Path) -> None:
    from mmlm.data import build, synth

    try:  # TFDS draws its own progress bars while preparing; the trainer has its own console
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
    except ImportError:
        pass
    s = config.synthetic
    raw = out / "raw"
    log.info("building synthetic %s data in %s", s.kind, out)
    size = int(s.image_size) or None
    jsons = {}
    for split, num in ((key["train_split"], key["num_train"]), (key["eval_split"], key["num_eval"])):
        weights = key["train_category_weights"] if split == key["train_split"] else None
        jsons[split] = str(synth.synthesize(s.kind, raw, int(num), int(s.seed), split, image_size=size,
                                            questions_per_image=int(s.questions_per_image),
                                            category_weights=weights, overwrite=True, progress=False))
    media = raw if s.kind != "moving_shapes" else None
    videos = raw if s.kind == "moving_shapes" else None
    write_categories(raw / f"{key['eval_split']}_questions.jsonl", out / CATEGORIES_FILE)
    # TFDS prints its own "Downloading and preparing ..." lines; keep the console for the trainer.
    with contextlib.redirect_stdout(io.StringIO()):
        build.build_dataset(jsons, media, out / "built", videos_dir=videos, name=f"synthetic_{s.kind}",
                            overwrite=True, progress=False, text=TextSettings.from_data_config(config.data))


SUPERVISION_SAMPLE = 2000  # records read at train start when the build report did not count these settings


def check_supervision(config: ml_collections.ConfigDict, split: str) -> Counts:
    """Counts the examples of `split` that `data.max_text_len` cuts, and says so (a warning line).

    The build report's counts are used when they were made with the same tokenizer, template, system
    prompt and text length; otherwise up to `SUPERVISION_SAMPLE` records spread over the split are
    encoded. A split in which every checked example keeps no supervised token is a `UserError`: it
    would train on nothing.
    """
    from mmlm.data import build
    from mmlm.data.pipeline import open_split
    from mmlm.data.tokenizer import load_tokenizer

    settings = TextSettings.from_data_config(config.data)
    dataset_dir = Path(config.data.dataset_dir)
    counts, total = None, None
    try:
        report = json.loads((dataset_dir / build.REPORT_FILE).read_text(encoding="utf-8"))
        if report.get("text_settings") == settings.to_json():
            counts = Counts.from_json(report["splits"][split]["text"])
    except (OSError, ValueError, KeyError, TypeError):
        counts = None  # no usable report: count here
    if counts is None:
        source = open_split(dataset_dir, split)
        total = len(source)
        tokenizer = load_tokenizer(settings.tokenizer)
        counts = Counts()
        for i in np.unique(np.linspace(0, total - 1, min(total, SUPERVISION_SAMPLE)).astype(np.int64)):
            rec = source[int(i)]
            rid = rec["id"].decode("utf-8") if isinstance(rec["id"], bytes) else str(rec["id"])
            counts.add(classify(tokenizer, json.loads(rec["conversations"]), settings), rid)
    line = counts.summary(f"split {split!r}", settings, total=total)
    if counts.checked and counts.unsupervised == counts.checked:
        raise UserError(f"{line}: every one, so training would learn nothing")
    if line:
        log.warning("%s", line)
    return counts


def resolve_data_config(config: ml_collections.ConfigDict) -> None:
    """Pins fields of `config.data` that follow the model.

    `data.hd_grid` (None: the model's) is validated in the shared convention
    (1 = no HD; an old 0 reads as 1, `mmlm.data.config.hd_grid_value`) and
    must equal `model.hd_grid`: the views per frame the data makes are the
    views the model reads.
    """
    model_hd = hd_grid_value(config.model.get("hd_grid", 1), "model.hd_grid")
    data_hd = config.data.get("hd_grid")
    data_hd = model_hd if data_hd is None else hd_grid_value(data_hd)
    if data_hd != model_hd:
        raise UserError(f"data.hd_grid={data_hd} but model.hd_grid={model_hd}: the model reads the views the "
                        "data makes; leave data.hd_grid unset (None) to follow the model")
    config.data.hd_grid = data_hd
    if config.data.get("image_size") is None:
        config.data.image_size = int(config.model.image_size)


def write_categories(questions: Path, out: Path) -> None:
    """example_id (the record's index in the split JSON) -> category of its first question.

    Question ids are `KIND-SPLIT-INDEX` (one question per record) or
    `KIND-SPLIT-INDEX-qJ` (several), see `mmlm.data.synth`.
    """
    cats: dict[str, str] = {}
    with open(questions) as f:
        for line in f:
            q = json.loads(line)
            qid = str(q["question_id"])
            base, _, turn = qid.rpartition("-q")
            if not base or not turn.isdigit():
                base = qid
            index = str(int(base.rsplit("-", 1)[1]))
            cats.setdefault(index, q["category"])
    write_text_atomic(out, json.dumps(cats, indent=0) + "\n")


def make_pipeline(config: ml_collections.ConfigDict, split: str, *, train: bool, local_only: bool = False):
    """The grain pipeline of `split` for this process (`local_only`: as if this were the only process)."""
    from mmlm.data.pipeline import make_dataset

    if local_only:
        return make_dataset(config, split, process_index=0, process_count=1, train=train)
    return make_dataset(config, split, process_index=jax.process_index(), process_count=jax.process_count(),
                        train=train)


def _global_max(value: int) -> int:
    """The largest `value` over all processes (every process calls this with its own)."""
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, length_buckets: Sequence[int] = (),
                 frame_buckets: Sequence[int] = ()) -> dict[str, jax.Array]:
    """Host-local batch (B/P rows per process) -> global arrays (B rows) split over (data, fsdp).

    With `length_buckets` the text arrays (B, T) are first cut to the smallest bucket that holds the
    longest conversation of the global batch; with `frame_buckets` `images` (B, F, K, H, W, 3) and
    `frame_mask` (B, F) are cut along F to the smallest bucket that holds the global batch's sample with
    the most real frames (F itself when no bucket does). Every process cuts to the same sizes.
    """
    from mmlm.data.pipeline import bucket_length, cut_frames, cut_text, longest_text, most_frames

    if length_buckets and "attention_mask" in local:
        longest = _global_max(longest_text(local))
        local = cut_text(local, bucket_length(longest, length_buckets, local["attention_mask"].shape[1]))
    if frame_buckets and "frame_mask" in local:
        frames = _global_max(most_frames(local))
        local = cut_frames(local, bucket_length(frames, frame_buckets, local["frame_mask"].shape[1]))
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local.items()}


def take(iterator: Iterator[dict[str, np.ndarray]], n: int | None) -> Iterator[dict[str, np.ndarray]]:
    for i, batch in enumerate(iterator):
        if n is not None and i >= n:
            return
        yield batch
