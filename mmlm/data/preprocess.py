"""Image, high-resolution and video preprocessing (LLaVA-1.5 / LLaVA-Mini conventions).

Images follow LLaVA-1.5's `image_aspect_ratio="pad"` path: pad to a square
with the CLIP mean colour (image centred), resize to `image_size` with PIL
bicubic (what `CLIPImageProcessor` does to a square image), scale to [0, 1],
normalise with the CLIP mean/std. Arrays are float32, channels last.

High resolution (LLaVA-Mini-HD): the padded square is resized to
`hd_grid * image_size`, cut into `hd_grid x hd_grid` crops in raster order,
and the whole padded image (resized to `image_size`) comes last, so one image
gives K = hd_grid**2 + 1 views. `hd_grid` 1 means no HD (K = 1), as in the
model config: a 1x1 grid would only repeat the whole image (LLaVA-Mini's
`resolution_ratio` 1). 0, the old data-side spelling of "no HD", is accepted
as the same (configs read it through `mmlm.data.config.hd_grid_value`).

Video: frames sampled at `target_fps` (1 fps in LLaVA-Mini): a video of
duration D seconds gives T = min(max_frames, max(1, round(D * fps))) frames,
the frame index being the middle of each of T equal segments.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from mmlm.pixels import CLIP_MEAN, CLIP_STD, normalization_constants  # CLIP ViT-L/14-336 constants


def num_views(hd_grid: int) -> int:
    """Views per image/frame: 1 without HD (hd_grid 1; the old 0 too), else hd_grid**2 crops + the whole image."""
    if hd_grid < 0:
        raise ValueError(f"hd_grid must be >= 0, got {hd_grid}")
    return 1 if hd_grid <= 1 else hd_grid * hd_grid + 1


# Modes holding one channel of more than 8 bits: PIL's convert("RGB") clips them to 0..255 (a 16-bit
# grayscale image becomes almost all white), so `_high_bit_depth_to_l` scales them to 8 bits first.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Modes with an alpha channel (premultiplied "La"/"RGBa" included): composited on white.
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """A single-channel image of more than 8 bits -> mode "L", scaled to 0..255.

    * 16-bit modes ("I;16", "I;16B", ...): x / 257 (65535 -> 255), rounded.
    * "I" (32-bit integers; what older Pillows and TIFF give for 16-bit data):
      values in 0..255 are taken as 8-bit, values in 0..65535 as 16-bit
      (x / 257); anything else is rescaled from its min..max.
    * "F" (float): values in 0..1 are scaled by 255, values in 0..255 kept,
      anything else rescaled from its min..max; NaN becomes 0.
    """
    x = np.asarray(img)
    if img.mode.startswith("I;16"):
        x = x.astype(np.float64) / 257.0
    else:
        x = np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            x = x * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            pass
        elif img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
            x = x / 257.0
        else:
            x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB (itself if already RGB).

    High-bit-depth grayscale (16-bit, 32-bit integer, float) is scaled to 8
    bits (see `_high_bit_depth_to_l`); transparent pixels are composited on
    white; every other mode goes through PIL's `convert("RGB")`.
    """
    if img.mode == "RGB":
        return img
    if img.mode in HIGH_BIT_DEPTH_MODES:
        return _high_bit_depth_to_l(img).convert("RGB")
    if img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, name: str | None = None) -> Image.Image:
    """Decodes encoded image bytes (any PIL format) to a fully loaded 8-bit RGB image, upright.

    The EXIF orientation tag (phone photos store the pixels sideways and the
    rotation in the tag) is applied, so the pixels are what a viewer shows.
    `name` (the file it came from) is used in error messages. Raises OSError
    for undecodable or truncated data and ValueError for an image with more
    pixels than PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`).
    """
    of = f" of {name!r}" if name else ""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # force the full decode so truncated files fail here
    except Image.DecompressionBombError as e:
        raise ValueError(f"the image{of} is too large to decode safely ({e}); a decompression bomb, or an "
                         "image to downscale first") from None
    except Image.UnidentifiedImageError:
        raise OSError(f"cannot identify the image format{of}: not an image format PIL reads "
                      f"({len(data)} bytes)") from None
    return _to_rgb(upright(img))


EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 = upright, 2-8 = mirrored and/or rotated


def upright(img: Image.Image) -> Image.Image:
    """`img` with its EXIF orientation applied (PIL's `ImageOps.exif_transpose`); itself when upright."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: nothing says the pixels are rotated
        return img
    if orientation not in range(2, 9):
        return img
    return ImageOps.exif_transpose(img)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Loads an image file as a fully decoded 8-bit RGB PIL image."""
    with open(path, "rb") as f:
        return decode_image(f.read(), name=str(path))


def mean_color(mean: Sequence[float] = CLIP_MEAN) -> tuple[int, int, int]:
    """The padding colour: the normalisation mean in 0..255 (LLaVA's expand2square)."""
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pads `img` to a square canvas of `fill` colour, image centred (LLaVA)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def normalize(pixels: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (..., W, 3) -> float32 (..., W, 3): (x / 255 - mean) / std.

    Computed as x * (1 / (255 std)) - mean / std, in place on rows of W * 3
    values with the per-channel constants tiled along the row: numpy's inner
    loop then runs over long contiguous rows instead of 3-element pixels
    (about 5x faster; equal up to float32 rounding). `out` (float32, same
    shape, C-contiguous) receives the result when given.
    """
    scale, offset = normalization_constants(mean, std)
    if out is None:
        out = np.empty(pixels.shape, np.float32)
    if out.shape != pixels.shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous with shape {pixels.shape}, got {out.shape}")
    if pixels.ndim < 2 or pixels.shape[-1] != 3:
        raise ValueError(f"expected (..., W, 3) pixels, got shape {pixels.shape}")
    width = pixels.shape[-2]
    rows = out.reshape(-1, width * 3)
    rows[...] = np.ascontiguousarray(pixels).reshape(-1, width * 3)  # uint8 -> float32
    rows *= np.tile(scale, width)
    rows -= np.tile(offset, width)
    return out


def denormalize(x: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
                std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """Inverse of `normalize`, back to uint8 (for display)."""
    y = (np.asarray(x, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)) * 255.0
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def image_views(img: Image.Image, image_size: int, hd_grid: int = 1,
                mean: Sequence[float] = CLIP_MEAN) -> list[Image.Image]:
    """The K square views of an image (PIL, before normalisation).

    K = 1 (the padded, resized image) or hd_grid**2 crops in raster order
    followed by the whole image.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    square = expand_to_square(_to_rgb(img), mean_color(mean))
    whole = square.resize((image_size, image_size), Image.BICUBIC)
    if num_views(hd_grid) == 1:
        return [whole]
    big = square.resize((hd_grid * image_size,) * 2, Image.BICUBIC)
    crops = [big.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
             for r in range(hd_grid) for c in range(hd_grid)]
    return crops + [whole]


def preprocess_image(img: Image.Image, image_size: int, hd_grid: int = 1,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                     out: np.ndarray | None = None) -> np.ndarray:
    """PIL image -> float32 (K, image_size, image_size, 3), CLIP-normalised.

    K = 1 without HD, hd_grid**2 + 1 with HD (crops in raster order, then the
    whole image). `out` (float32 (K, H, W, 3)) receives the result when given.
    """
    views = image_views(img, image_size, hd_grid, mean)
    pixels = np.stack([np.asarray(v, np.uint8) for v in views])
    return normalize(pixels, mean, std, out=out)


# ----------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------

def num_sampled_frames(num_frames: int, native_fps: float, *, target_fps: float = 1.0,
                       max_frames: int) -> int:
    """How many frames to sample: round(duration * target_fps), in [1, max_frames]."""
    if num_frames <= 0:
        return 0
    if native_fps <= 0 or target_fps <= 0:
        raise ValueError(f"fps must be positive, got native {native_fps}, target {target_fps}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    duration = num_frames / native_fps
    wanted = int(math.floor(duration * target_fps + 0.5))  # round half up
    return max(1, min(wanted, max_frames, num_frames))


def sample_frame_indices(num_frames: int, native_fps: float, *, target_fps: float = 1.0,
                         max_frames: int) -> np.ndarray:
    """Indices of the frames to keep: the middle of each of T equal segments.

    Args:
      num_frames: frames in the video.
      native_fps: the video's frame rate.
      target_fps: sampling rate (LLaVA-Mini: 1 frame per second).
      max_frames: cap on the number of sampled frames.

    Returns:
      int64 (T,) increasing indices, T = `num_sampled_frames(...)`; segment i
      covers [i N / T, (i + 1) N / T) and contributes floor((2i + 1) N / 2T).
    """
    t = num_sampled_frames(num_frames, native_fps, target_fps=target_fps, max_frames=max_frames)
    i = np.arange(t, dtype=np.int64)
    return ((2 * i + 1) * num_frames) // (2 * t)


def subsample_uniform(count: int, max_frames: int) -> np.ndarray:
    """Middle-of-segment indices of min(count, max_frames) out of `count` items.

    Used on frames already sampled at 1 fps (stored by `mmlm data build`) when
    the pipeline's `max_frames` is smaller than what was stored.
    """
    if count <= max_frames:
        return np.arange(count, dtype=np.int64)
    i = np.arange(max_frames, dtype=np.int64)
    return ((2 * i + 1) * count) // (2 * max_frames)


@dataclasses.dataclass
class VideoFrames:
    """Frames decoded from a video."""

    frames: list[Image.Image]  # RGB frames, in time order
    indices: np.ndarray  # (T,) frame indices in the video
    times: np.ndarray  # (T,) timestamps in seconds (index / native_fps)
    native_fps: float
    num_frames: int  # frames in the video


def _count_frames(container, stream) -> int:
    """Frame count from the header, else by demuxing packets (no decoding)."""
    if stream.frames:
        return int(stream.frames)
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return count


def decode_video(source: str | os.PathLike | bytes, *, max_frames: int,
                 target_fps: float = 1.0) -> VideoFrames:
    """Decodes the frames chosen by `sample_frame_indices` with PyAV.

    Args:
      source: a video file path or its bytes.
      max_frames: cap on the number of frames.
      target_fps: sampling rate in frames per second.

    Raises:
      ValueError: if the file has no video stream or no decodable frame.
      av.error.FFmpegError (an OSError / ValueError subclass): undecodable file.
    """
    import av

    src = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    with av.open(src) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        native_fps = float(rate) if rate else 0.0
        if native_fps <= 0:
            raise ValueError("unknown frame rate")
        total = _count_frames(container, stream)
        wanted = sample_frame_indices(total, native_fps, target_fps=target_fps, max_frames=max_frames)
        wanted_set = {int(i) for i in wanted}
        last_wanted = int(wanted[-1]) if len(wanted) else -1
        frames: dict[int, Image.Image] = {}
        last: tuple[int, Image.Image] | None = None
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted_set:
                frames[index] = frame.to_image().convert("RGB")
            if index >= last_wanted:
                break
            last = (index, frame)
        # The header can over-count frames; fall back to the last decoded one.
        if len(frames) < len(wanted) and last is not None:
            fallback = last[1].to_image().convert("RGB")
            for i in wanted:
                frames.setdefault(int(i), fallback)
    if not frames:
        raise ValueError("no decodable frame")
    order = sorted(frames)
    idx = np.asarray(order, np.int64)
    return VideoFrames([frames[i] for i in order], idx, idx / native_fps, native_fps, total)


def preprocess_frames(frames: Sequence[Image.Image], max_frames: int, image_size: int,
                      hd_grid: int = 1, mean: Sequence[float] = CLIP_MEAN,
                      std: Sequence[float] = CLIP_STD) -> tuple[np.ndarray, int]:
    """Frames -> float32 (max_frames, K, H, W, 3) zero-padded, and the real count.

    If more than `max_frames` frames are given, `subsample_uniform` picks them.
    """
    keep = subsample_uniform(len(frames), max_frames)
    k = num_views(hd_grid)
    out = np.zeros((max_frames, k, image_size, image_size, 3), np.float32)
    for slot, i in enumerate(keep):
        preprocess_image(frames[int(i)], image_size, hd_grid, mean, std, out=out[slot])
    return out, len(keep)


def load_video_frames(path: str | os.PathLike, max_frames: int, image_size: int, *,
                      target_fps: float = 1.0, hd_grid: int = 1, mean: Sequence[float] = CLIP_MEAN,
                      std: Sequence[float] = CLIP_STD) -> tuple[np.ndarray, int]:
    """Decodes and preprocesses a video file.

    Returns:
      frames: float32 (max_frames, K, image_size, image_size, 3), CLIP-normalised,
        zero past `count` (K = 1 without HD);
      count: number of real frames (1 <= count <= max_frames).
    """
    video = decode_video(path, max_frames=max_frames, target_fps=target_fps)
    return preprocess_frames(video.frames, max_frames, image_size, hd_grid, mean, std)
