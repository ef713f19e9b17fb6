"""Pixel normalisation constants shared by the data pipeline and the model (numpy only).

Pixels are normalised as (x / 255 - mean) / std per RGB channel. The host
(`mmlm.data.preprocess.normalize`) and the model (uint8 `images` normalised
on device, `mmlm.models.llava_mini.normalize_images`) both compute it as
x * scale - offset with the float32 constants of `normalization_constants`,
so the two paths agree to float32 rounding.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# CLIP ViT-L/14-336 preprocessing constants (openai/clip-vit-large-patch14-336), RGB, on 0..1 pixels.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalization_constants(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """float32 (3,) `scale` = 1 / (255 std) and `offset` = mean / std: normalised = uint8 * scale - offset."""
    std32 = np.asarray(std, np.float32)
    scale = (1.0 / (255.0 * std32)).astype(np.float32)
    offset = (np.asarray(mean, np.float32) / std32).astype(np.float32)
    return scale, offset


def check_mean_std(mean: Sequence[float], std: Sequence[float], key: str) -> None:
    """Raises ValueError unless `mean` and `std` are 3 finite numbers each and every std is positive."""
    for name, values in (("image_mean", mean), ("image_std", std)):
        ok = isinstance(values, (tuple, list)) and len(values) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)
        if not ok:
            raise ValueError(f"{key}.{name}={values!r}: give 3 numbers (R, G, B) on 0..1 pixels, "
                             f"e.g. {CLIP_MEAN if name == 'image_mean' else CLIP_STD}")
    if any(s <= 0 for s in std):
        raise ValueError(f"{key}.image_std={tuple(std)!r}: every std must be > 0 (pixels are divided by it)")
