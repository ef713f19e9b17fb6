"""Media of an API request -> model pixels: `data:` URLs, or `file://` paths under a media root.

All decoding goes through `mmlm.data.preprocess` (`decode_image`, `decode_video`), as in training and
`mmlm chat`, so a request sees exactly the pixels the model was trained on. Every failure is a
`MediaError` whose message names the part of the request at fault; the API turns it into a 400.
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
from pathlib import Path

import numpy as np

from mmlm.infer.loading import InferenceModel


class MediaError(ValueError):
    """A media part the server cannot use (its message is shown to the client)."""


def _data_url_bytes(url: str, where: str) -> tuple[str, bytes]:
    """`data:<mime>;base64,<payload>` -> (mime, bytes)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise MediaError(f"{where}: a data URL must look like data:image/png;base64,<payload>")
    meta = header[len("data:"):].split(";")
    if "base64" not in meta[1:]:
        raise MediaError(f"{where}: only base64 data URLs are accepted (data:<type>;base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{where}: the base64 payload is broken ({e})") from None
    if not data:
        raise MediaError(f"{where}: the data URL is empty")
    return meta[0].lower(), data


def _file_url_bytes(url: str, where: str, media_root: str | None) -> bytes:
    """`file:///path` -> bytes, only for a regular file inside `media_root` (symlinks resolved)."""
    if media_root is None:
        raise MediaError(f"{where}: file:// URLs are refused; the server was started without --media_root "
                         "(send the media as a data: URL instead)")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise MediaError(f"{where}: file:// URLs must name a local path (file:///path), got host "
                         f"{parsed.netloc!r}")
    root = Path(media_root).resolve()
    path = Path(urllib.parse.unquote(parsed.path)).resolve()
    if os.path.commonpath([root, path]) != str(root):
        raise MediaError(f"{where}: {str(path)!r} is outside the server's media root")
    if not path.is_file():
        raise MediaError(f"{where}: {str(path.relative_to(root))!r} is not a file under the media root")
    try:
        return path.read_bytes()
    except OSError as e:
        raise MediaError(f"{where}: cannot read {str(path.relative_to(root))!r} ({e.strerror})") from None


def url_bytes(url: object, where: str, media_root: str | None) -> bytes:
    """The bytes a media URL names (data: or file:// under `media_root`)."""
    if not isinstance(url, str) or not url:
        raise MediaError(f"{where}: expected a URL string (data:... or file://...)")
    if url.startswith("data:"):
        return _data_url_bytes(url, where)[1]
    if url.startswith("file://"):
        return _file_url_bytes(url, where, media_root)
    scheme = url.split(":", 1)[0] if ":" in url else url[:20]
    raise MediaError(f"{where}: unsupported URL scheme {scheme!r}; send a data: URL (base64) or a file:// "
                     "path under the server's --media_root (the server fetches nothing from the network)")


def image_pixels(im: InferenceModel, data: bytes, where: str) -> np.ndarray:
    """Encoded image bytes -> pixels (1, K, H, W, 3) float32, as `mmlm chat` makes them."""
    from mmlm.data import preprocess

    try:
        img = preprocess.decode_image(data)
    except (OSError, ValueError, SyntaxError) as e:  # undecodable, truncated, decompression bomb
        raise MediaError(f"{where}: cannot decode the image: {e}") from None
    return preprocess.preprocess_image(img, im.image_size, im.hd_grid, im.image_mean, im.image_std)[None]


def video_pixels(im: InferenceModel, data: bytes, where: str) -> np.ndarray:
    """Encoded video bytes -> pixels (T, K, H, W, 3) float32, T <= the model's frame cap at its fps."""
    from mmlm.data import preprocess

    try:
        video = preprocess.decode_video(data, max_frames=im.max_frames, target_fps=im.video_fps)
    except Exception as e:  # PyAV's errors (FFmpegError family) and ValueError: not a decodable video
        if isinstance(e, (OSError, ValueError)) or type(e).__module__.split(".")[0] == "av":
            raise MediaError(f"{where}: cannot decode the video: {e}") from None
        raise
    frames, count = preprocess.preprocess_frames(video.frames, im.max_frames, im.image_size, im.hd_grid,
                                                 im.image_mean, im.image_std)
    if count < 1:
        raise MediaError(f"{where}: the video has no frames")
    return frames[:count]
