"""Shared helpers of the tests that need a model on disk: a tiny random checkpoint and a test image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


def tiny_checkpoint_and_image(root: Path, seed: int = 1) -> Path:
    """Writes `root/ckpt` (configs/tiny.py with random weights from `seed`) and `root/img.png` (a random
    56 x 40 RGB image); returns `root`."""
    from mmlm.checkpoint import save_model
    from mmlm.config_utils import load_config
    from mmlm.infer.random_model import random_params
    from mmlm.models.config import model_config_from_dict

    config = load_config(TINY)
    save_model(str(root / "ckpt"), random_params(model_config_from_dict(config.model), seed=seed), config)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "img.png")
    return root
