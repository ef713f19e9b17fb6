"""Linear probe: how well do a trained demo ViT's patch features tell the shape of the object in the patch?

Renders `shapes` scenes the way the synthesiser does (3x3 grid, 1-3 objects),
runs the vision tower of a training workdir (or a random initialisation of
it, `--random_init SEED`) and fits a softmax regression from the features of
each object patch to its shape on one set of scenes, scored on another. The
demo's 3x3 patch grid matches the scene grid, so every object lies in
exactly one patch. Chance is 25%.

    python experiments/demo_learning/probe_vit.py /tmp/demo
    python experiments/demo_learning/probe_vit.py /tmp/demo --random_init 1
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmlm.data import synth
from mmlm.data.preprocess import normalize
from mmlm.infer.loading import load_inference_model
from mmlm.models.vit import VisionTower

GRID = 3


def scenes(num: int, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(num, size, size, 3) normalised images and (num, 9) shape labels per grid cell (-1 = empty)."""
    images, labels = [], []
    for i in range(num):
        rng = synth.record_rng("shapes", 777, split, i)
        background = synth.BACKGROUNDS[int(rng.integers(len(synth.BACKGROUNDS)))]
        objs = synth._grid_scene(rng, size, GRID, int(rng.integers(1, 4)), (0.11 * size, 0.145 * size))
        images.append(normalize(np.asarray(synth.render(objs, size, background), np.uint8)))
        cells = np.full(GRID * GRID, -1, np.int32)
        for o in objs:
            cells[o.row * GRID + o.col] = synth.SHAPES.index(o.shape)
        labels.append(cells)
    return np.stack(images), np.stack(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", help="a training workdir of configs/demo.py (its latest checkpoint is used)")
    ap.add_argument("--random_init", type=int, default=None, help="probe a fresh ViT with this init seed instead")
    ap.add_argument("--num_fit", type=int, default=3000, help="scenes to fit the probe on")
    ap.add_argument("--num_test", type=int, default=500, help="scenes to score it on")
    args = ap.parse_args()

    im = load_inference_model(workdir=args.workdir)
    cfg = im.cfg
    if cfg.vision.image_size // cfg.vision.patch_size != GRID:
        raise SystemExit(f"the probe needs a {GRID}x{GRID} patch grid (image_size / patch_size), got "
                         f"{cfg.vision.image_size}/{cfg.vision.patch_size}")
    tower = VisionTower(cfg.vision, scan_layers=cfg.scan_layers)
    size = cfg.vision.image_size
    params = im.params["vision"]
    if args.random_init is not None:
        params = tower.init(jax.random.key(args.random_init), jnp.zeros((1, size, size, 3)))["params"]
    encode = jax.jit(lambda x: tower.apply({"params": params}, x))

    def object_features(num: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = scenes(num, split, size)
        feats = np.concatenate([np.asarray(encode(images[i:i + 250])) for i in range(0, num, 250)])
        feats, labels = feats.reshape(-1, feats.shape[-1]), labels.reshape(-1)
        return feats[labels >= 0], labels[labels >= 0]

    x_fit, y_fit = object_features(args.num_fit, "probe_fit")
    x_test, y_test = object_features(args.num_test, "probe_test")
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_test = (x_fit - mean) / std, (x_test - mean) / std

    tx = optax.adam(1e-2)
    w = (jnp.zeros((x_fit.shape[1], len(synth.SHAPES))), jnp.zeros(len(synth.SHAPES)))
    opt = tx.init(w)

    @jax.jit
    def step(w, opt):
        def loss(w):
            logits = x_fit @ w[0] + w[1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y_fit).mean() + 1e-4 * jnp.sum(w[0] ** 2)
        value, grads = jax.value_and_grad(loss)(w)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(w, updates), opt, value

    for _ in range(1500):
        w, opt, value = step(w, opt)
    acc = float(np.mean(np.argmax(x_test @ np.asarray(w[0]) + np.asarray(w[1]), -1) == y_test))
    what = f"random init {args.random_init}" if args.random_init is not None else f"{args.workdir} ({im.source})"
    print(f"shape from one object patch, linear probe: {acc:.1%} of {len(y_test)} test objects "
          f"(fit loss {float(value):.3f}; chance 25%) -- ViT of {what}")


if __name__ == "__main__":
    main()
