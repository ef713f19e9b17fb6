"""Vision pretraining on per-patch labels of synthetic scenes (`train.vision_pretrain`)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from mmlm.config_utils import load_config
from mmlm.data import synth
from mmlm.train.config import validate_config
from mmlm.errors import UserError
from mmlm.models.config import model_config_from_dict
from mmlm.models.llava_mini import LlavaMini
from mmlm.train.trainer import build_setup, init_state
from mmlm.train.vision_pretrain import labelled_images, pretrain_vision

REPO = Path(__file__).resolve().parents[1]


def test_scene_is_the_record_make_record_renders(tmp_path):
    synth.synthesize("shapes", tmp_path, 4, 3, "train", image_size=48, questions_per_image=2, progress=False)
    records = json.loads((tmp_path / "train.json").read_text())
    for i, rec in enumerate(records):
        img, objs = synth.scene("shapes", i, 3, "train", 48)
        np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(tmp_path / rec["image"]).convert("RGB")))
        assert 1 <= len(objs) <= 3
    with pytest.raises(ValueError, match="still images"):
        synth.scene("moving_shapes", 0, 0, "train", 64)


def test_patch_labels_name_the_object_centred_in_each_patch():
    objs = [synth.Obj("red", "circle", 8.0, 8.0, 5.0), synth.Obj("orange", "cross", 40.0, 24.0, 5.0)]
    colors, shapes = synth.patch_labels(objs, 48, 3)  # 16 px patches, raster order
    want_c, want_s = np.zeros(9, np.int32), np.zeros(9, np.int32)
    want_c[0], want_s[0] = list(synth.COLORS).index("red") + 1, synth.SHAPES.index("circle") + 1
    want_c[5], want_s[5] = list(synth.COLORS).index("orange") + 1, synth.SHAPES.index("cross") + 1
    np.testing.assert_array_equal(colors, want_c)
    np.testing.assert_array_equal(shapes, want_s)
    # A finer patch raster than the scene grid: the centre (40, 24) of 48 px lies in patch (row 2, col 3) of 4x4.
    colors, _ = synth.patch_labels(objs[1:], 48, 4)
    assert np.flatnonzero(colors).tolist() == [2 * 4 + 3]


def _tiny(steps: int = 40):
    config = load_config(str(REPO / "configs/tiny.py"))
    config.train.vision_pretrain.update(steps=steps, batch_size=16, num_images=64, eval_images=16, learning_rate=3e-3)
    return config


def test_labelled_images_follow_the_models_view():
    config = _tiny()
    data = labelled_images(config, "train", 5)
    size = int(config.model.image_size)
    grid = size // int(config.model.vision.patch_size)
    assert data["images"].shape == (5, size, size, 3) and data["images"].dtype == np.uint8
    assert data["colors"].shape == data["shapes"].shape == (5, grid * grid)
    # Every object of a scene labels exactly one patch, with matching colour and shape presence.
    for i in range(5):
        _, objs = synth.scene("shapes", i, int(config.synthetic.seed), "train", int(config.synthetic.image_size))
        assert np.count_nonzero(data["colors"][i]) == np.count_nonzero(data["shapes"][i]) == len(objs)


def test_pretraining_learns_the_patch_labels_deterministically():
    config = _tiny()
    setup = build_setup(config, 10)
    state = init_state(setup, 0)
    vision0 = state["params"]["vision"]
    shardings = setup.state_shardings["params"]["vision"]
    out, summary = pretrain_vision(config, setup.model, vision0, shardings, progress=False)
    assert jax.tree.structure(out) == jax.tree.structure(vision0)
    assert all(a.shape == b.shape and a.sharding == s for a, b, s in
               zip(jax.tree.leaves(out), jax.tree.leaves(vision0), jax.tree.leaves(shardings)))
    assert summary["steps"] == 40 and 0 <= summary["held_out_shape_accuracy"] <= 1
    one = _tiny(steps=1)  # its only step's loss is the loss before any update
    _, first = pretrain_vision(one, setup.model, vision0, shardings, progress=False)
    assert summary["final_loss"] < 0.5 * first["final_loss"], (first, summary)
    again, summary2 = pretrain_vision(config, setup.model, vision0, shardings, progress=False)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert summary2["final_loss"] == summary["final_loss"]
    # Only the ViT the model reads changed: the features differ from the fresh tower's.
    model = LlavaMini(model_config_from_dict(config.model))
    images = labelled_images(config, "val", 2)["images"][:, None, None]
    f0 = model.apply({"params": {"vision": vision0}}, images, method=LlavaMini.encode_images)
    f1 = model.apply({"params": {"vision": out}}, images, method=LlavaMini.encode_images)
    assert not np.allclose(np.asarray(f0), np.asarray(f1))


def _position_spread(model, vision, images) -> float:
    """Fraction of the feature variance that the patch position explains (variance of the per-patch mean)."""
    f = np.asarray(model.apply({"params": {"vision": vision}}, images, method=LlavaMini.encode_images))[:, 0, 0]
    return float(f.mean(0).var(0).sum() / f.reshape(-1, f.shape[-1]).var(0).sum())


def test_position_heads_keep_where_each_patch_is():
    """`position_weight` > 0 adds row / column heads: they are scored, and the features keep more of the
    patch position than with the colour and shape heads alone."""
    config = _tiny(steps=60)
    setup = build_setup(config, 10)
    state = init_state(setup, 0)
    vision0, shardings = state["params"]["vision"], setup.state_shardings["params"]["vision"]
    plain, summary = pretrain_vision(config, setup.model, vision0, shardings, progress=False)
    assert "held_out_position_accuracy" not in summary
    config.train.vision_pretrain.position_weight = 1.0
    placed, summary = pretrain_vision(config, setup.model, vision0, shardings, progress=False)
    assert summary["held_out_position_accuracy"] > 0.6, summary  # chance: 1 / grid (0.25)
    images = labelled_images(config, "val", 16)["images"][:, None, None]
    assert _position_spread(setup.model, placed, images) > 2 * _position_spread(setup.model, plain, images)
    config.train.vision_pretrain.position_weight = -1.0
    with pytest.raises(UserError, match="position_weight"):
        validate_config(config)


@pytest.mark.parametrize("kind", ["", "moving_shapes"])
def test_pretraining_needs_synthetic_still_images(kind):
    config = _tiny()
    config.synthetic.kind = kind
    with pytest.raises(UserError, match="per-patch labels from a synthetic still-image dataset"):
        validate_config(config)
    config.train.vision_pretrain.steps = 0  # off: any data will do
    validate_config(config)
