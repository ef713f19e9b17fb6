"""Prompt batches for generation: right-padded ids plus stacked media.

`make_batch` takes each row's prompt ids (with one IMAGE_TOKEN_ID where the
media goes, or none for text-only rows) and its media array, and returns the
batch dict `LlavaMini` expects. Shapes are padded up to buckets (prompt
length to a multiple, frames to the batch maximum) so that batches of a long
evaluation reuse a few compiled programs instead of compiling per batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mmlm import IMAGE_TOKEN_ID
from mmlm.models.config import ModelConfig

# Text tokens: a single prompt (`mmlm chat`, its `auto` cascade, each request of `mmlm serve`) is padded to a
# multiple of this, so a few programs cover every prompt. One value for all three: the server's answers
# equal chat's only when both run the same program.
PROMPT_BUCKET = 32


def views_per_frame(cfg: ModelConfig) -> int:
    """K: 1, or n*n crops + the whole image for LLaVA-Mini-HD."""
    return 1 if cfg.hd_grid == 1 else cfg.hd_grid**2 + 1


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def media_dtype(media: Sequence[np.ndarray]) -> np.dtype:
    """uint8 when every array is uint8 pixels, float32 when none is; a mix is a ValueError."""
    kinds = {np.asarray(m).dtype == np.uint8 for m in media}
    if len(kinds) > 1:
        raise ValueError("a batch mixes uint8 pixels and normalised float images; use one kind")
    return np.dtype(np.uint8) if kinds == {True} else np.dtype(np.float32)


def make_batch(cfg: ModelConfig, prompts: Sequence[Sequence[int]], media: Sequence[np.ndarray | None], *,
               pad_id: int, pad_len_to: int = 8, frames: int | None = None, batch_size: int | None = None,
               fuse_masks: Sequence[Sequence[bool] | None] | None = None) -> dict[str, np.ndarray]:
    """Builds a generation batch.

    Args:
      prompts: per row, prompt ids; a row with media has exactly one IMAGE_TOKEN_ID.
      media: per row, None or pixels (F, K, H, W, 3) (an image is F = 1): normalised floats, or uint8
        pixels (e.g. from the training pipeline), which the model normalises; one kind per batch.
      pad_id: id used for right padding (masked, never attended).
      pad_len_to: the prompt length T is rounded up to a multiple of this.
      frames: pad F to this many frames (default: the largest in the batch).
      batch_size: pad the batch with copies of row 0 up to this many rows (callers drop them).
      fuse_masks: per row, the prompt's fuse mask (`templates.encode_prompt(..., return_fuse_mask=True)`),
        which keeps a chat history's answers out of pre-fusion; None (or a None row): a single-turn
        prompt, all instruction text.

    Returns:
      input_ids, attention_mask, fuse_mask: (B, T); and, if any row has media,
      images (B, F, K, H, W, 3) (uint8 for uint8 media, else float32) and frame_mask (B, F) bool.
    """
    if len(prompts) != len(media):
        raise ValueError(f"{len(prompts)} prompts but {len(media)} media entries")
    if not prompts:
        raise ValueError("empty batch")
    rows = list(range(len(prompts)))
    if batch_size is not None:
        if batch_size < len(prompts):
            raise ValueError(f"batch_size {batch_size} < {len(prompts)} prompts")
        rows += [0] * (batch_size - len(prompts))
    for i, (ids, px) in enumerate(zip(prompts, media)):
        n_ph = sum(1 for t in ids if t == IMAGE_TOKEN_ID)
        if px is None and n_ph:
            raise ValueError(f"prompt {i} has an image placeholder but no media")
        if px is not None and n_ph != 1:
            raise ValueError(f"prompt {i} has media but {n_ph} image placeholders (need exactly 1)")
    b = len(rows)
    t = round_up(max(len(prompts[r]) for r in rows), pad_len_to)
    ids = np.full((b, t), pad_id, np.int32)
    mask = np.zeros((b, t), bool)
    fuse = np.zeros((b, t), bool)
    for j, r in enumerate(rows):
        n = len(prompts[r])
        ids[j, :n] = prompts[r]
        mask[j, :n] = True
        row_fuse = fuse_masks[r] if fuse_masks is not None else None
        if row_fuse is None:
            fuse[j, :n] = np.asarray(prompts[r]) != IMAGE_TOKEN_ID
        elif len(row_fuse) != n:
            raise ValueError(f"fuse mask of prompt {r} has {len(row_fuse)} entries for {n} ids")
        else:
            fuse[j, :n] = row_fuse
    batch = {"input_ids": ids, "attention_mask": mask, "fuse_mask": fuse}
    with_media = [m for m in media if m is not None]
    if not with_media:
        return batch
    k, s = views_per_frame(cfg), cfg.image_size
    for i, px in enumerate(media):
        if px is not None and tuple(px.shape[1:]) != (k, s, s, 3):
            raise ValueError(f"media of prompt {i} has shape {px.shape}; this model needs (F, {k}, {s}, {s}, 3)")
    f = frames or max(m.shape[0] for m in with_media)
    images = np.zeros((b, f, k, s, s, 3), media_dtype(with_media))
    frame_mask = np.zeros((b, f), bool)
    for j, r in enumerate(rows):
        px = media[r]
        if px is None:
            continue
        if px.shape[0] > f:
            raise ValueError(f"media of prompt {r} has {px.shape[0]} frames, more than frames={f}")
        images[j, : px.shape[0]] = px
        frame_mask[j, : px.shape[0]] = True
    batch.update(images=images, frame_mask=frame_mask)
    return batch
