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


# ------------------------------------------------------------------- every image mode PIL can open

def _gray_ramp() -> np.ndarray:
    """An 8-bit grayscale ramp covering 0..255 (with the extremes), 16 x 16."""
    return np.arange(256, dtype=np.uint8).reshape(16, 16)


def _saved(img: Image.Image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _high_bit_cases():
    """(name, encoded bytes) of one 8-bit ramp stored at higher bit depths, in every container PIL reads."""
    g = _gray_ramp()
    g16 = g.astype(np.uint16) * 257  # 8 -> 16 bits exactly (255 -> 65535)
    return [
        ("I;16 png", _saved(Image.fromarray(g16), "PNG")),
        ("I;16 tiff", _saved(Image.fromarray(g16), "TIFF")),
        ("I;16B tiff", _saved(Image.fromarray(g16).convert("I").convert("I;16B"), "TIFF")),
        ("I 16-bit values tiff", _saved(Image.fromarray(g16.astype(np.int32)), "TIFF")),
        ("I 8-bit values tiff", _saved(Image.fromarray(g.astype(np.int32)), "TIFF")),
        ("F 0..1 tiff", _saved(Image.fromarray(g.astype(np.float32) / 255.0), "TIFF")),
        ("F 0..255 tiff", _saved(Image.fromarray(g.astype(np.float32)), "TIFF")),
    ]


@pytest.mark.parametrize("name,data", _high_bit_cases(), ids=[c[0] for c in _high_bit_cases()])
def test_high_bit_depth_images_are_scaled_to_8_bits(name, data):
    """16-bit / 32-bit / float grayscale decode to the 8-bit image they encode, not PIL's clipped white."""
    import io

    src = Image.open(io.BytesIO(data))
    assert src.mode in P.HIGH_BIT_DEPTH_MODES, src.mode  # PIL really opens it at high bit depth
    want = np.repeat(_gray_ramp()[..., None], 3, axis=-1)
    got = np.asarray(P.decode_image(data))
    np.testing.assert_array_equal(got, want, err_msg=name)
    assert np.asarray(P.image_views(src, 16)[0]).mean() < 200  # the PIL-image path too, not near-white


def test_pil_convert_is_what_goes_wrong_for_16_bit():
    """The reason for the scaling: PIL's convert("RGB") clips 16-bit values (almost everything becomes 255)."""
    g16 = _gray_ramp().astype(np.uint16) * 257
    clipped = np.asarray(Image.fromarray(g16).convert("RGB"))
    assert (clipped == 255).mean() > 0.99
    assert (np.asarray(P.decode_image(_saved(Image.fromarray(g16), "PNG"))) == 255).mean() < 0.01


def _openable_modes():
    """(mode, format) pairs for every PIL mode that PIL saves and reopens in that mode."""
    import io

    cases = []
    for mode in ("1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "La", "PA",
                 "RGBa", "RGBX", "I;16", "I;16L", "I;16B", "I;16N"):
        for fmt in ("PNG", "TIFF", "JPEG", "BMP"):
            try:
                img = Image.new(mode, (4, 4))
                reopened = Image.open(io.BytesIO(_saved(img, fmt)))
                reopened.load()
            except (OSError, ValueError, KeyError):
                continue
            cases.append((mode, fmt, reopened.mode))
    return cases


@pytest.mark.parametrize("mode,fmt,opened", _openable_modes())
def test_every_mode_pil_opens_decodes_like_pil_in_8_bit_rgb(mode, fmt, opened):
    """Every (mode, container) PIL round-trips: RGB uint8 equal to PIL's own 8-bit conversion.

    The reference is PIL: convert("RGB") for 8-bit modes, alpha composited on
    white for modes with transparency, and for high-bit-depth modes PIL's
    conversion of the 8-bit image they encode (`_high_bit_depth_to_l`).
    """
    import io

    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    if mode in P.HIGH_BIT_DEPTH_MODES:
        gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        if mode.startswith("I;16"):
            img = Image.fromarray(gray.astype(np.uint16) * 257)
            if mode == "I;16B":
                img = img.convert("I").convert("I;16B")
        elif mode == "I":
            img = Image.fromarray(gray.astype(np.int32) * 257)
        else:
            img = Image.fromarray(gray.astype(np.float32) / 255.0)
        want = np.asarray(Image.fromarray(gray).convert("RGB"))
    else:
        img = base.convert(mode) if mode not in ("La", "RGBa", "PA") else base.convert("RGBA").convert(mode)
        reopened = Image.open(io.BytesIO(_saved(img, fmt)))
        reopened.load()
        if reopened.mode in P.ALPHA_MODES or (reopened.mode == "P" and "transparency" in reopened.info):
            rgba = reopened.convert("RGBA")
            want = np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB"))
        else:
            want = np.asarray(reopened.convert("RGB"))
    got = P.decode_image(_saved(img, fmt))
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got), want)


def test_undecodable_image_names_the_file_and_bombs_are_refused(tmp_path, monkeypatch):
    (tmp_path / "notes.png").write_bytes(b"not an image")
    with pytest.raises(OSError) as e:
        P.load_image(tmp_path / "notes.png")
    assert "notes.png" in str(e.value) and "BytesIO" not in str(e.value)
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # 64 x 64 is then a "bomb" (> 2x the limit)
    with pytest.raises(ValueError, match="big.png.*too large"):
        P.load_image(tmp_path / "big.png")
