"""grain pipeline: batch contract, determinism, exact resume, per-process shards."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from mmlm import IGNORE_INDEX, IMAGE_TOKEN_ID
from mmlm.data import build, synth
from mmlm.data.config import default_data_config
from mmlm.data import preprocess
from mmlm.data.pipeline import (bucket_length, cut_frames, cut_text, frame_buckets, length_buckets, make_dataset,
                                most_frames)
from mmlm.errors import UserError
from mmlm.data.tokenizer import load_tokenizer

N_TRAIN, N_VAL = 48, 21


@pytest.fixture(scope="module")
def data_shapes_dir(tmp_path_factory):
    """A synthetic shapes dataset (train 48, val 21) built with TFDS."""
    root = tmp_path_factory.mktemp("shapes")
    jsons = {split: synth.synthesize("shapes", root / "raw", n, 3, split, image_size=32, progress=False)
             for split, n in (("train", N_TRAIN), ("val", N_VAL))}
    build.build_dataset(jsons, root / "raw", root / "ds", name="shapes", progress=False)
    return root


def _config(dataset_dir, **overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = default_data_config()
    config.data.update(dict(dataset_dir=str(dataset_dir), max_text_len=48, batch_size=8, image_size=16,
                            read_threads=2, prefetch_buffer_size=8, system_prompt=""))
    config.data.update(overrides)
    return config


def _ids(batches) -> list[list[int]]:
    return [b["example_id"].tolist() for b in batches]


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batch_contract(data_shapes_dir):
    config = _config(data_shapes_dir / "ds", with_stats=True)
    pipe = make_dataset(config, "train", process_index=0, process_count=1, train=True)
    batch = next(iter(pipe))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s, d) for k, (s, d) in pipe.spec.items()}
    # data.pixels_on_device (the default): uint8 pixels, normalised by the model.
    assert batch["images"].shape == (8, 1, 1, 16, 16, 3) and batch["images"].dtype == np.uint8
    tok = load_tokenizer(config.data.tokenizer)
    records = {i: r for i, r in enumerate(json.loads((data_shapes_dir / "raw/train.json").read_text()))}
    for row in range(8):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[n:] == tok.pad_id).all() and (labels[n:] == IGNORE_INDEX).all()
        assert (ids == IMAGE_TOKEN_ID).sum() == 1 and labels[ids == IMAGE_TOKEN_ID] == IGNORE_INDEX
        record = records[int(batch["example_id"][row])]
        supervised = labels[labels != IGNORE_INDEX]
        assert tok.decode(supervised[:-1]) == record["conversations"][1]["value"]
        assert supervised[-1] == tok.eos_id
        assert (ids[labels != IGNORE_INDEX] == supervised).all()  # labels are not shifted
        assert batch["frame_mask"][row].tolist() == [True]
        assert not batch["truncated"][row] and batch["num_tokens"][row] == n
    assert np.abs(batch["images"]).max() > 0.5


def test_pixels_on_device_off_normalises_on_the_host(data_shapes_dir, data_video_dir):
    """pixels_on_device False: float32 CLIP-normalised images, exactly `preprocess.normalize` of the uint8
    batch (unreal frames 0.0 there, uint8 0 here); the spec follows the flag."""
    for ds, extra in ((data_shapes_dir / "ds", {}), (data_video_dir, dict(batch_size=2, max_frames=8))):
        batches = {}
        for on_device in (True, False):
            pipe = make_dataset(_config(ds, pixels_on_device=on_device, **extra), "train", process_index=0,
                                process_count=1, train=False)
            batches[on_device] = next(iter(pipe))
            assert pipe.spec["images"][1] == (np.uint8 if on_device else np.float32)
            assert batches[on_device]["images"].dtype == pipe.spec["images"][1]
        pixels, host = batches[True], batches[False]
        np.testing.assert_array_equal(pixels["example_id"], host["example_id"])
        want = preprocess.normalize(pixels["images"], preprocess.CLIP_MEAN, preprocess.CLIP_STD)
        want[~pixels["frame_mask"]] = 0.0
        np.testing.assert_array_equal(host["images"], want)
        assert not pixels["images"][~pixels["frame_mask"]].any()
    with pytest.raises(UserError, match="pixels_on_device"):
        make_dataset(_config(data_shapes_dir / "ds", pixels_on_device=None), "train", process_index=0,
                     process_count=1, train=False)


def test_truncation_is_counted_in_batches(data_shapes_dir):
    pipe = make_dataset(_config(data_shapes_dir / "ds", max_text_len=12, with_stats=True), "train",
                        process_index=0, process_count=1, train=True)
    batch = next(iter(pipe))
    assert batch["truncated"].all() and (batch["num_tokens"] > 12).all()
    assert ((batch["input_ids"] == IMAGE_TOKEN_ID).sum(1) == 1).all()


def test_same_seed_same_order_and_epochs(data_shapes_dir):
    config = _config(data_shapes_dir / "ds", seed=5, num_epochs=2)
    a = make_dataset(config, "train", process_index=0, process_count=1, train=True)
    b = make_dataset(config, "train", process_index=0, process_count=1, train=True)
    ids_a, ids_b = _ids(a), _ids(b)
    assert ids_a == ids_b and a.num_batches == len(ids_a) == 12 and a.batches_per_epoch == 6
    first, second = sum(ids_a[:6], []), sum(ids_a[6:], [])
    assert sorted(first) == sorted(second) == list(range(N_TRAIN))  # each epoch sees every record once
    assert first != second  # and is shuffled anew
    assert first != list(range(N_TRAIN))
    other = make_dataset(_config(data_shapes_dir / "ds", seed=6, num_epochs=2), "train",
                         process_index=0, process_count=1, train=True)
    assert _ids(other) != ids_a
    unshuffled = make_dataset(_config(data_shapes_dir / "ds", shuffle=False, num_epochs=1), "train",
                              process_index=0, process_count=1, train=True)
    assert sum(_ids(unshuffled), []) == list(range(N_TRAIN))


def test_cached_examples_give_identical_batches_and_are_processed_once(data_shapes_dir, monkeypatch):
    """`data.cache_examples`: three epochs, every batch equal to the uncached pipeline's; the records are
    processed in the first epoch only; a resumed cached iterator continues identically."""
    from mmlm.data import pipeline as pipeline_lib

    calls = []
    original = pipeline_lib.ExampleProcessor.__call__
    monkeypatch.setattr(pipeline_lib.ExampleProcessor, "__call__",
                        lambda self, record: calls.append(1) or original(self, record))
    plain = _config(data_shapes_dir / "ds", seed=2, num_epochs=3)
    cached = _config(data_shapes_dir / "ds", seed=2, num_epochs=3, cache_examples=True)
    want = list(make_dataset(plain, "train", process_index=0, process_count=1, train=True))
    calls.clear()
    it = iter(make_dataset(cached, "train", process_index=0, process_count=1, train=True))
    got = _take(it, 8)
    state = json.loads(json.dumps(it.get_state()))
    got += list(it)
    assert len(calls) == N_TRAIN  # 3 epochs, each record processed once
    assert len(got) == len(want) == 18
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for key in w:
            np.testing.assert_array_equal(w[key], g[key])
    resumed = iter(make_dataset(cached, "train", process_index=0, process_count=1, train=True))
    resumed.set_state(state)
    for w, g in zip(want[8:], resumed):
        np.testing.assert_array_equal(w["input_ids"], g["input_ids"])
        np.testing.assert_array_equal(w["images"], g["images"])


def test_restore_mid_epoch_gives_identical_batches(data_shapes_dir):
    pipe = make_dataset(_config(data_shapes_dir / "ds", seed=1), "train", process_index=0,
                        process_count=1, train=True)
    it = iter(pipe)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 6)  # runs into the second epoch
    resumed = iter(make_dataset(_config(data_shapes_dir / "ds", seed=1), "train", process_index=0,
                                process_count=1, train=True))
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 6)):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_orbax_checkpoint_of_the_iterator(data_shapes_dir, tmp_path):
    """The recipe in the pipeline docstring: grain's Orbax handler saves/restores the iterator."""
    import grain
    import orbax.checkpoint as ocp

    config = _config(data_shapes_dir / "ds", seed=2)
    it = iter(make_dataset(config, "train", process_index=0, process_count=1, train=True))
    _take(it, 2)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _ids(_take(it, 4))
    fresh = iter(make_dataset(config, "train", process_index=0, process_count=1, train=True))
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert _ids(_take(fresh, 4)) == expected
    assert (tmp_path / "ckpt/2/data/process_0-of-1.json").is_file()


@pytest.mark.parametrize("process_count", [2, 4])
def test_train_shards_disjoint_covering_and_global_batches(data_shapes_dir, process_count):
    config = _config(data_shapes_dir / "ds", seed=3, num_epochs=1)
    single = _ids(make_dataset(config, "train", process_index=0, process_count=1, train=True))
    shards = [_ids(make_dataset(config, "train", process_index=p, process_count=process_count, train=True))
              for p in range(process_count)]
    flat = [sum(s, []) for s in shards]
    assert all(len(s) == len(single) for s in shards)  # same number of steps on every host
    assert all(len(b) == 8 // process_count for s in shards for b in s)
    for p in range(process_count):
        for q in range(p + 1, process_count):
            assert not set(flat[p]) & set(flat[q])
    assert sorted(sum(flat, [])) == list(range(N_TRAIN))
    for step, global_ids in enumerate(single):  # a global batch does not depend on the host count
        assert sorted(sum((s[step] for s in shards), [])) == sorted(global_ids)


def test_eval_shards_are_padded_disjoint_and_covering(data_shapes_dir):
    config = _config(data_shapes_dir / "ds", eval_batch_size=6)
    pipes = [make_dataset(config, "val", process_index=p, process_count=3, train=False) for p in range(3)]
    batches = [list(p) for p in pipes]
    assert all(len(b) == pipes[0].num_batches == 4 for b in batches)  # ceil(21 / 6) steps everywhere
    ids = [i for bs in batches for b in bs for i in b["example_id"].tolist()]
    real = [i for i in ids if i >= 0]
    assert sorted(real) == list(range(N_VAL)) and ids.count(-1) == 24 - N_VAL
    for bs in batches:
        for b in bs:
            pad = b["example_id"] == -1
            assert not b["attention_mask"][pad].any() and not b["frame_mask"][pad].any()
            assert (b["labels"][pad] == IGNORE_INDEX).all() and not b["images"][pad].any()
    ordered = make_dataset(config, "val", process_index=0, process_count=1, train=False)
    assert [i for b in ordered for i in b["example_id"].tolist()][:N_VAL] == list(range(N_VAL))


def test_config_errors(data_shapes_dir):
    with pytest.raises(ValueError, match="multiple of process_count"):
        make_dataset(_config(data_shapes_dir / "ds", batch_size=6), "train", process_index=0,
                     process_count=4, train=True)
    with pytest.raises(ValueError, match="no split"):
        make_dataset(_config(data_shapes_dir / "ds"), "test", process_index=0, process_count=1, train=True)
    with pytest.raises(build.BuildError, match="mmlm data build"):
        make_dataset(_config(data_shapes_dir / "raw"), "train", process_index=0, process_count=1, train=True)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_dataset(_config(data_shapes_dir / "ds", batch_size=64), "train", process_index=0,
                     process_count=1, train=True)


def test_image_size_and_hd_grid_follow_the_model_config(data_shapes_dir):
    config = _config(data_shapes_dir / "ds", image_size=None, hd_grid=None)
    config.model = ml_collections.ConfigDict({"image_size": 8, "hd_grid": 2})
    pipe = make_dataset(config, "val", process_index=0, process_count=1, train=False)
    assert next(iter(pipe))["images"].shape == (8, 1, 5, 8, 8, 3)


@pytest.fixture(scope="module")
def data_video_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    path = synth.synthesize("moving_shapes", root / "raw", 4, 0, "train", image_size=32, progress=False)
    build.build_dataset({"train": path}, None, root / "ds", videos_dir=root / "raw", name="moving",
                        progress=False)
    return root / "ds"


def test_video_batches(data_video_dir):
    config = _config(data_video_dir, batch_size=2, max_frames=4, image_size=16)
    batch = next(iter(make_dataset(config, "train", process_index=0, process_count=1, train=False)))
    assert batch["images"].shape == (2, 4, 1, 16, 16, 3)
    assert batch["frame_mask"].tolist() == [[True] * 4] * 2  # 6 stored frames, capped at 4
    assert ((batch["input_ids"] == IMAGE_TOKEN_ID).sum(1) == 1).all()
    config.data.max_frames = 8
    batch = next(iter(make_dataset(config, "train", process_index=0, process_count=1, train=False)))
    assert batch["frame_mask"].sum(1).tolist() == [6, 6]
    assert not batch["images"][:, 6:].any() and batch["images"][:, :6].any()


@pytest.mark.slow
def test_worker_processes_match_in_process_and_resume(data_shapes_dir):
    base = _config(data_shapes_dir / "ds", seed=4)
    want = _ids(_take(iter(make_dataset(base, "train", process_index=0, process_count=1, train=True)), 5))
    pipe = make_dataset(_config(data_shapes_dir / "ds", seed=4, worker_count=1), "train",
                        process_index=0, process_count=1, train=True)
    it = iter(pipe)
    got = _ids(_take(it, 2))
    state = it.get_state()
    it.close()
    resumed = iter(pipe)
    resumed.set_state(state)
    got += _ids(_take(resumed, 3))
    resumed.close()
    assert got == want  # one worker slices nothing away: same batches as in-process


def test_length_buckets(data_shapes_dir):
    assert bucket_length(17, (16, 24, 32), 48) == 24
    assert bucket_length(16, (32, 16, 24), 48) == 16
    assert bucket_length(40, (16, 24, 32), 48) == 48  # longer than every bucket: the full length
    assert bucket_length(5, (), 48) == 48
    config = _config(data_shapes_dir / "ds", length_buckets=(32, 16))
    assert length_buckets(config.data) == (16, 32)
    for bad in ((0, 16), (16.5,), (True,)):
        with pytest.raises(UserError, match="length_buckets"):
            length_buckets(_config(data_shapes_dir / "ds", length_buckets=bad).data)
    batch = next(iter(make_dataset(_config(data_shapes_dir / "ds"), "train", process_index=0, process_count=1,
                                   train=True)))
    n = int(batch["attention_mask"].sum(axis=1).max())
    cut = cut_text(batch, n)
    for k in ("input_ids", "labels", "attention_mask", "fuse_mask"):
        np.testing.assert_array_equal(cut[k], batch[k][:, :n])
    # Only padding was cut.
    pad_id = load_tokenizer(_config(data_shapes_dir / "ds").data.tokenizer).pad_id
    assert not batch["attention_mask"][:, n:].any() and not batch["fuse_mask"][:, n:].any()
    assert (batch["labels"][:, n:] == IGNORE_INDEX).all() and (batch["input_ids"][:, n:] == pad_id).all()
    assert cut["images"] is batch["images"] and cut["example_id"] is batch["example_id"]
    with pytest.raises(ValueError, match="would drop tokens"):
        cut_text(batch, n - 1)


def test_frame_buckets(data_video_dir):
    """A batch is cut along F to the smallest bucket that holds its most real frames (F when none does);
    only frames that are not real go."""
    config = _config(data_video_dir, batch_size=2, max_frames=8, frame_buckets=(7, 2))
    assert frame_buckets(config.data) == (2, 7)
    for bad in ((0, 4), (2.5,), (True,), ("8",)):
        with pytest.raises(UserError, match="frame_buckets"):
            frame_buckets(_config(data_video_dir, frame_buckets=bad).data)
    batch = next(iter(make_dataset(config, "train", process_index=0, process_count=1, train=False)))
    assert batch["frame_mask"].sum(1).tolist() == [6, 6] and most_frames(batch) == 6
    assert bucket_length(most_frames(batch), (2, 7), 8) == 7
    assert bucket_length(most_frames(batch), (2, 4), 8) == 8  # no bucket holds 6 frames: max_frames
    assert bucket_length(most_frames(batch), (8, 16), 8) == 8  # buckets >= F are capped at F
    cut = cut_frames(batch, 7)
    assert cut["images"].shape == (2, 7, 1, 16, 16, 3) and cut["frame_mask"].shape == (2, 7)
    np.testing.assert_array_equal(cut["images"], batch["images"][:, :7])
    np.testing.assert_array_equal(cut["frame_mask"], batch["frame_mask"][:, :7])
    assert cut["input_ids"] is batch["input_ids"] and cut["example_id"] is batch["example_id"]
    with pytest.raises(ValueError, match="would drop real frames"):
        cut_frames(batch, 5)
    # Images (1 real frame) and text-only samples (none) in one batch: the smallest bucket holds them.
    mixed = dict(batch, frame_mask=np.zeros_like(batch["frame_mask"]))
    assert most_frames(mixed) == 0 and bucket_length(most_frames(mixed), (2, 7), 8) == 2
    mixed["frame_mask"][0, 0] = True
    assert most_frames(mixed) == 1 and cut_frames(mixed, 1)["images"].shape[1] == 1
