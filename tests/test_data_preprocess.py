"""Image / HD / video preprocessing and frame sampling."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmlm.data import preprocess as P
from mmlm.data import synth


def test_normalize_matches_the_formula_and_inverts():
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    want = (px / 255.0 - np.asarray(P.CLIP_MEAN)) / np.asarray(P.CLIP_STD)
    got = P.normalize(px)
    assert got.dtype == np.float32 and got.shape == px.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(P.denormalize(got), px)


def test_pad_to_square_with_clip_mean_colour():
    mean_rgb = P.mean_color()
    assert mean_rgb == (122, 116, 104)  # LLaVA's expand2square background
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    square = P.expand_to_square(img, mean_rgb)
    assert square.size == (40, 40)
    assert square.getpixel((0, 9)) == mean_rgb and square.getpixel((39, 30)) == mean_rgb
    assert square.getpixel((0, 10)) == (255, 0, 0) and square.getpixel((39, 29)) == (255, 0, 0)
    # At image_size == side no resampling happens: the output is exact.
    out = P.preprocess_image(img, 40)
    assert out.shape == (1, 40, 40, 3) and out.dtype == np.float32
    pixels = P.denormalize(out[0])
    np.testing.assert_array_equal(pixels[:10], np.broadcast_to(mean_rgb, (10, 40, 3)))
    np.testing.assert_array_equal(pixels[10:30], np.broadcast_to((255, 0, 0), (20, 40, 3)))
    np.testing.assert_array_equal(pixels[30:], np.broadcast_to(mean_rgb, (10, 40, 3)))
    # Resizing keeps a uniform image uniform.
    sq = P.preprocess_image(Image.new("RGB", (16, 16), (0, 0, 255)), 8)
    assert sq.shape == (1, 8, 8, 3)
    np.testing.assert_array_equal(P.denormalize(sq[0]), np.broadcast_to((0, 0, 255), (8, 8, 3)))


def test_grayscale_and_transparent_images_become_rgb(tmp_path):
    Image.new("L", (6, 6), 200).save(tmp_path / "g.png")
    Image.new("RGBA", (6, 6), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert P.load_image(tmp_path / "g.png").getpixel((0, 0)) == (200, 200, 200)
    assert P.load_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_hd_views_are_raster_crops_then_whole_image():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR quadrants
    img = Image.new("RGB", (32, 32))
    for q, c in enumerate(colours):
        r, col = divmod(q, 2)
        img.paste(Image.new("RGB", (16, 16), c), (col * 16, r * 16))
    out = P.preprocess_image(img, 8, hd_grid=2)
    assert out.shape == (5, 8, 8, 3) and P.num_views(2) == 5
    views = P.denormalize(out)
    for q, c in enumerate(colours):
        np.testing.assert_array_equal(views[q][4, 4], c)
    whole = views[4]
    np.testing.assert_array_equal(whole[1, 1], colours[0])
    np.testing.assert_array_equal(whole[6, 6], colours[3])
    assert P.num_views(0) == P.num_views(1) == 1
    assert P.preprocess_image(img, 8, hd_grid=1).shape == (1, 8, 8, 3)


@pytest.mark.parametrize("total,fps,max_frames,want", [
    (24, 4.0, 100, [2, 6, 10, 14, 18, 22]),  # 6 s at 1 fps: middle of each 1 s segment
    (24, 4.0, 3, [4, 12, 20]),                # capped: 3 segments of 2 s
    (30, 30.0, 8, [15]),                      # 1 s -> one frame, the middle one
    (10, 30.0, 8, [5]),                       # shorter than 1 s still gives one frame
    (75, 30.0, 8, [12, 37, 62]),              # 2.5 s rounds up to 3 frames
    (3, 1.0, 8, [0, 1, 2]),
    (0, 30.0, 8, []),
])
def test_sample_frame_indices(total, fps, max_frames, want):
    got = P.sample_frame_indices(total, fps, max_frames=max_frames)
    assert got.tolist() == want


def test_sample_frame_indices_other_rate_and_subsample():
    # 10 s at 0.5 fps: 5 segments of 8 frames.
    assert P.sample_frame_indices(40, 4.0, target_fps=0.5, max_frames=10).tolist() == [4, 12, 20, 28, 36]
    assert P.subsample_uniform(6, 8).tolist() == [0, 1, 2, 3, 4, 5]
    assert P.subsample_uniform(6, 3).tolist() == [1, 3, 5]
    with pytest.raises(ValueError):
        P.sample_frame_indices(10, 0.0, max_frames=4)


def _write_counter_video(path, n=24, fps=4):
    """Frame k is a solid grey of level 10 * k: decoded frames reveal their index."""
    frames = [np.full((32, 32, 3), 10 * k, np.uint8) for k in range(n)]
    synth.encode_video(frames, fps, path)


def test_decode_video_picks_middle_frames(tmp_path):
    path = tmp_path / "v.mp4"
    _write_counter_video(path)
    video = P.decode_video(path, max_frames=64)
    assert video.num_frames == 24 and video.native_fps == pytest.approx(4.0)
    assert video.indices.tolist() == [2, 6, 10, 14, 18, 22]
    np.testing.assert_allclose(video.times, [0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
    levels = [int(np.asarray(f).mean().round()) for f in video.frames]
    assert levels == pytest.approx([10 * i for i in video.indices], abs=3)
    # From bytes too.
    assert P.decode_video(path.read_bytes(), max_frames=2).indices.tolist() == [6, 18]


def test_load_video_frames_pads_to_max_frames(tmp_path):
    path = tmp_path / "v.mp4"
    _write_counter_video(path)
    frames, count = P.load_video_frames(path, 8, 16)
    assert frames.shape == (8, 1, 16, 16, 3) and frames.dtype == np.float32 and count == 6
    assert np.all(frames[6:] == 0) and not np.all(frames[5] == 0)
    frames, count = P.load_video_frames(path, 3, 16, hd_grid=2)
    assert frames.shape == (3, 5, 16, 16, 3) and count == 3


def test_undecodable_media_raise(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(Exception):
        P.load_image(tmp_path / "bad.png")
    with pytest.raises(Exception):
        P.decode_video(tmp_path / "bad.mp4", max_frames=4)
