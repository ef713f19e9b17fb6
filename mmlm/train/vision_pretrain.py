"""Vision pretraining on per-patch scene labels: the from-scratch stand-in for a pretrained CLIP tower.

LLaVA and LLaVA-Mini start from a vision tower that was pretrained elsewhere (CLIP). A model trained
from scratch on the synthetic data (the demo) must otherwise learn its ViT's features from the answers
alone, through the compressed token and the pre-fusion layers: a slow, seed-dependent signal (runs that
fail never learn to name shapes, and a linear probe of their ViT tells the shapes apart far worse than
one of a run that succeeds; `experiments/demo_learning`). This stage gives the ViT the features first:
for `train.vision_pretrain.steps` steps it trains the ViT with two linear heads on every patch feature
(B, N, Dv) that name the colour and the shape of the object centred in that patch, or "none"; the labels
come from the scene descriptions `mmlm.data.synth` renders the train images from. With
`position_weight` > 0 two more heads name every patch's row and column: the colour and shape heads
alone grow those features until the patch position is a fraction of a per cent of the feature variance
(a linear probe reads the row of a `grid_shapes` patch 73% of the time after 300 steps, against 99.9%
with the position heads, where it explains half the variance), and questions that name a place need it.
The heads are then dropped and the main training starts from the pretrained ViT (every part still trains).

It runs on a fresh start only: a resumed run restores its ViT from the checkpoint. It needs a still-image
`config.synthetic.kind`; the ViT sees each image whole (one view, also for HD models). The optimizer is
AdamW (weight decay 0.01) with the global gradient norm clipped to 1, as in the main recipe. Every
process renders the same images and takes the same steps (the batch is replicated; the ViT keeps its
shardings): it is meant for the small from-scratch models this data trains.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmlm.data import synth
from mmlm.data.preprocess import image_views
from mmlm.models.llava_mini import LlavaMini
from mmlm.train.config import check_vision_pretrain

log = logging.getLogger(__name__)


def labelled_images(config: ml_collections.ConfigDict, split: str, num: int) -> dict[str, np.ndarray]:
    """Records 0..num-1 of a synthetic split as the ViT sees them, with per-patch labels.

    Returns `images` uint8 (num, H, W, 3) (the pipeline's pad-to-square + resize to model.image_size)
    and `colors`, `shapes` int32 (num, N): N = (H / patch)^2 patches in raster order, 0 = no object
    centred there, else 1 + the index into `synth.COLORS` / `synth.SHAPES`.
    """
    s, vision = config.synthetic, config.model.vision
    rendered = int(s.image_size) or synth.DEFAULT_SIZES[s.kind]
    size, grid = int(config.model.image_size), int(vision.image_size) // int(vision.patch_size)
    images = np.empty((num, size, size, 3), np.uint8)
    colors, shapes = np.empty((num, grid * grid), np.int32), np.empty((num, grid * grid), np.int32)
    for i in range(num):
        img, objs = synth.scene(s.kind, i, int(s.seed), split, rendered)
        images[i] = np.asarray(image_views(img, size, 1, tuple(config.model.image_mean))[0])
        colors[i], shapes[i] = synth.patch_labels(objs, rendered, grid)
    return {"images": images, "colors": colors, "shapes": shapes}


def _heads_init(key: jax.Array, width: int, grid: int) -> dict[str, jax.Array]:
    """Linear heads on a patch feature: colour and shape (+ "none"), row and column (of `grid`)."""
    init = jax.nn.initializers.lecun_normal()
    sizes = {"color": len(synth.COLORS) + 1, "shape": len(synth.SHAPES) + 1, "row": grid, "col": grid}
    # Colour and shape keep the keys they had before the position heads existed (the same pretraining as then).
    keys = [*jax.random.split(key), *jax.random.split(jax.random.fold_in(key, 1))]
    heads = {}
    for k, (name, n) in zip(keys, sizes.items()):
        heads[f"{name}_w"], heads[f"{name}_b"] = init(k, (width, n)), jnp.zeros(n)
    return heads


def _logits(model: LlavaMini, params: dict[str, Any], images: jax.Array) -> dict[str, jax.Array]:
    """uint8 (B, H, W, 3) -> {"color": (B, N, C+1), "shape": (B, N, S+1), "row", "col": (B, N, grid)} logits."""
    feats = model.apply({"params": {"vision": params["vision"]}}, images[:, None, None],
                        method=LlavaMini.encode_images)[:, 0, 0].astype(jnp.float32)  # (B, N, Dv)
    h = params["heads"]
    return {n: feats @ h[f"{n}_w"] + h[f"{n}_b"] for n in ("color", "shape", "row", "col")}


def _positions(grid: int) -> dict[str, jax.Array]:
    """Row and column of every patch, (N,) each, raster order."""
    idx = jnp.arange(grid * grid)
    return {"row": idx // grid, "col": idx % grid}


def _object_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of the patches holding an object whose label is predicted."""
    hit = (jnp.argmax(logits, -1) == labels) & (labels > 0)
    return jnp.sum(hit) / jnp.maximum(jnp.sum(labels > 0), 1)


def pretrain_vision(config: ml_collections.ConfigDict, model: LlavaMini, vision_params: Any,
                    vision_shardings: Any, *, progress: bool = True) -> tuple[Any, dict[str, float]]:
    """Trains `vision_params` on per-patch labels; returns them (in `vision_shardings`) and a summary."""
    check_vision_pretrain(config)  # for callers other than the trainer (which validated the whole config)
    vp = config.train.vision_pretrain
    steps, bs = int(vp.steps), int(vp.batch_size)
    t0 = time.time()
    train = labelled_images(config, config.data.train_split, int(vp.num_images))
    held = labelled_images(config, config.data.eval_split, int(vp.eval_images))
    warmup = steps // 10
    lr = optax.warmup_cosine_decay_schedule(0.0, float(vp.learning_rate), warmup, max(steps, warmup + 1),
                                            end_value=0.1 * float(vp.learning_rate))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01))
    grid = int(config.model.vision.image_size) // int(config.model.vision.patch_size)
    params = {"vision": vision_params, "heads": _heads_init(jax.random.key(int(config.seed)),
                                                             int(config.model.vision.width), grid)}
    opt_state = tx.init(params)
    position_weight = float(vp.get("position_weight", 0.0))
    where = _positions(grid)

    def loss_fn(p, batch):
        logits = _logits(model, p, batch["images"])
        ce = optax.softmax_cross_entropy_with_integer_labels
        loss = jnp.mean(ce(logits["color"], batch["colors"])) + jnp.mean(ce(logits["shape"], batch["shapes"]))
        if position_weight:
            loss += position_weight * sum(jnp.mean(ce(logits[k], jnp.broadcast_to(where[k], logits[k].shape[:2])))
                                          for k in ("row", "col"))
        return loss

    @jax.jit
    def step(p, o, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    @jax.jit
    def accuracy(p, batch):
        logits = _logits(model, p, batch["images"])
        position = jnp.mean(jnp.stack([jnp.argmax(logits[k], -1) == where[k] for k in ("row", "col")]))
        return (_object_accuracy(logits["color"], batch["colors"]), _object_accuracy(logits["shape"], batch["shapes"]),
                position)

    from tqdm import tqdm

    order = np.random.default_rng(int(config.seed)).integers(0, len(train["images"]), size=(steps, bs))
    bar = tqdm(range(steps), desc="vision pretraining", unit="step", disable=not progress, leave=False)
    loss = jnp.zeros(())
    for i in bar:
        params, opt_state, loss = step(params, opt_state, {k: v[order[i]] for k, v in train.items()})
        if (i + 1) % 50 == 0 or i + 1 == steps:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.close()
    color_acc, shape_acc, position_acc = accuracy(params, held)
    summary = {"steps": steps, "seconds": time.time() - t0, "final_loss": float(loss),
               "held_out_color_accuracy": float(color_acc), "held_out_shape_accuracy": float(shape_acc)}
    if position_weight:
        summary["held_out_position_accuracy"] = float(position_acc)  # row and column of every patch
    log.info("vision pretraining: %d steps in %.1f s, loss %.3f; held-out objects: colour %.1f%%, shape %.1f%%",
             steps, summary["seconds"], summary["final_loss"], 100 * summary["held_out_color_accuracy"],
             100 * summary["held_out_shape_accuracy"])
    return jax.device_put(params["vision"], vision_shardings), summary
