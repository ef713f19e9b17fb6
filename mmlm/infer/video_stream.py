"""Video frames as a stream: sampled at a frame rate, preprocessed one at a time.

`mmlm.data.preprocess.decode_video` keeps every sampled frame of a video in
host memory; an hour at 1 fps is 3,600 frames. `VideoStream` opens the file,
counts its frames (demuxing packets, no decoding) and picks the same frames
(`sample_frame_indices`: the middle of each of T equal segments, T =
round(duration * fps), optionally capped), then decodes them in order and
yields each one preprocessed exactly as training and `load_video_pixels` do
(`preprocess_image`: pad to square, resize, CLIP-normalise), so at most one
decoded frame and the consumer's chunk are alive at a time.

    stream = VideoStream("clip.mp4", image_size=336, fps=1.0)
    for chunk, count in stream.chunks(16):   # (16, K, H, W, 3) float32, real frames
        ...
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Sequence

import numpy as np

from mmlm.errors import UserError
from mmlm.pixels import CLIP_MEAN, CLIP_STD


@dataclasses.dataclass(frozen=True)
class Frame:
    """One sampled frame."""

    pixels: np.ndarray  # (K, H, W, 3) float32, CLIP-normalised (K views: 1, or HD crops + the whole image)
    index: int  # frame index in the video
    time: float  # timestamp in seconds (index / native fps)


def _user_error(path: str, e: Exception) -> Exception:
    """PyAV's FFmpegError family (some subclass ValueError) and our ValueErrors as one-line user errors."""
    if type(e).__module__.split(".")[0] == "av":
        return UserError(f"cannot decode video {path!r}: {e}")
    if isinstance(e, ValueError):
        return UserError(f"video {path!r} has no frames ({e})")
    return e


class VideoStream:
    """A video file's frames sampled at `fps`, decoded lazily (iterate it, or `chunks`).

    Opening probes the file (stream, frame rate, frame count) and raises a
    `UserError` for a missing, unreadable or frameless video; iteration decodes.
    Each iteration decodes the file again from the start (a multi-turn chat
    re-reads the video instead of holding it).

    Attributes:
      indices: (T,) int64 sampled frame indices; `times` (T,) their timestamps in seconds.
      native_fps, num_video_frames: the file's frame rate and frame count.
    """

    def __init__(self, path: str | os.PathLike, *, image_size: int, fps: float = 1.0,
                 max_frames: int | None = None, hd_grid: int = 1, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD):
        from mmlm.data import preprocess

        if fps <= 0:
            raise UserError(f"--fps must be > 0 frames per second, got {fps}")
        if max_frames is not None and max_frames < 1:
            raise UserError(f"--max_frames must be >= 1, got {max_frames}")
        self.path = str(path)
        self.image_size, self.hd_grid = int(image_size), int(hd_grid)
        self.mean, self.std = tuple(mean), tuple(std)
        self.fps = float(fps)
        try:
            import av

            with av.open(self.path) as container:
                if not container.streams.video:
                    raise ValueError("no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                self.native_fps = float(rate) if rate else 0.0
                if self.native_fps <= 0:
                    raise ValueError("unknown frame rate")
                self.num_video_frames = preprocess._count_frames(container, stream)
        except Exception as e:  # noqa: BLE001 - re-raised as a user error when it is one
            raise _user_error(self.path, e) from None
        if self.num_video_frames < 1:
            raise UserError(f"video {self.path!r} has no frames")
        cap = self.num_video_frames if max_frames is None else int(max_frames)
        self.indices = preprocess.sample_frame_indices(self.num_video_frames, self.native_fps,
                                                       target_fps=self.fps, max_frames=cap)
        self.times = self.indices / self.native_fps

    def __len__(self) -> int:
        return len(self.indices)

    def _preprocess(self, image) -> np.ndarray:
        from mmlm.data import preprocess

        return preprocess.preprocess_image(image.convert("RGB"), self.image_size, self.hd_grid, self.mean, self.std)

    def __iter__(self) -> Iterator[Frame]:
        """Yields the sampled frames in time order (exactly `len(self)` of them)."""
        import av

        wanted = [int(i) for i in self.indices]
        want = 0  # position in `wanted` of the next frame to yield
        last = None  # the last decoded frame: stands in for frames the header promised but the file lacks
        try:
            with av.open(self.path) as container:
                stream = container.streams.video[0]
                for index, frame in enumerate(container.decode(stream)):
                    last = frame
                    while want < len(wanted) and wanted[want] == index:  # an index may repeat: yield it again
                        yield Frame(self._preprocess(frame.to_image()), index, index / self.native_fps)
                        want += 1
                    if want == len(wanted):
                        return
        except av.error.FFmpegError as e:
            raise _user_error(self.path, e) from None
        if last is None:
            raise UserError(f"video {self.path!r} has no decodable frame")
        pixels = self._preprocess(last.to_image())  # the header over-counted frames
        for index in wanted[want:]:
            yield Frame(pixels, index, index / self.native_fps)

    def chunks(self, size: int, pad: bool = True) -> Iterator[tuple[np.ndarray, int]]:
        """Consecutive chunks of `size` frames: (pixels (size, K, H, W, 3) float32, real frame count).

        The last chunk is zero-padded to `size` frames (with `pad`; else it is cut to its real frames), the
        convention of padded frames in a batch (`make_batch`, `preprocess_frames`).
        """
        if size < 1:
            raise UserError(f"the video chunk size must be >= 1 frames, got {size}")
        k = 1 if self.hd_grid == 1 else self.hd_grid**2 + 1
        buf = np.zeros((size, k, self.image_size, self.image_size, 3), np.float32)
        n = 0
        for frame in self:
            buf[n] = frame.pixels
            n += 1
            if n == size:
                yield buf.copy(), n
                n = 0
        if n:
            buf[n:] = 0.0
            yield (buf.copy() if pad else buf[:n].copy()), n
