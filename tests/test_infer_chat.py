"""`mmlm chat`: answers equal greedy generation, clear errors, compression maps."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmlm.checkpoint import save_model
from mmlm.config_utils import load_config
from mmlm.cli import chat
from mmlm.infer.batching import make_batch
from mmlm.infer.compression_map import (compression_maps, map_grid_shape, query_attention,
                                        render_compression_map)
from mmlm.infer.generate import generate, trim_answer
from mmlm.infer.loading import encode_question, load_inference_model, load_media
from mmlm.infer.random_model import random_params
from mmlm.models.config import model_config_from_dict
from mmlm.models.llava_mini import LlavaMini


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random LLaVA-Mini checkpoint (Matryoshka budgets 1, 4) and a test image."""
    root = tmp_path_factory.mktemp("chat")
    config = load_config("configs/tiny.py")
    cfg = model_config_from_dict(config.model)
    save_model(str(root / "ckpt"), random_params(cfg, seed=1), config)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "img.png")
    return root


def _run(argv, stdin=""):
    out, err = io.StringIO(), io.StringIO()
    args = chat.build_parser().parse_args(argv)
    try:
        rc = chat.run(args, stdin=io.StringIO(stdin), out=out, err=err)
    except chat.UserError as e:
        return 2, out.getvalue(), str(e)
    return rc, out.getvalue(), err.getvalue()


def test_one_shot_answer_equals_greedy_generation(ckpt):
    argv = ["--checkpoint", str(ckpt / "ckpt"), "--image", str(ckpt / "img.png"), "--prompt",
            "What color is the circle?", "--max_new_tokens", "6", "--num_vision_tokens", "1"]
    rc, out, err = _run(argv)
    assert rc == 0
    assert "1 vision token(s) per image" in err
    im = load_inference_model(checkpoint=str(ckpt / "ckpt"))
    pixels = load_media(im, ckpt / "img.png")
    assert pixels.shape == (1, 1, 32, 32, 3)
    prompt = encode_question(im, "What color is the circle?", True)
    batch = make_batch(im.cfg, [prompt], [pixels], pad_id=im.tokenizer.pad_id)
    tokens, lengths = generate(im.cfg, im.params, batch, max_new_tokens=6, eos_id=im.stop_ids,
                               num_vision_tokens=1)
    expected = im.tokenizer.decode(trim_answer(tokens[0], lengths[0]))
    assert out == expected + "\n"


def test_int8_weights_answer_equals_greedy_generation_of_the_int8_model(ckpt):
    """`--weights int8` serves the quantised model (`load_inference_model(weights="int8")`)."""
    argv = ["--checkpoint", str(ckpt / "ckpt"), "--image", str(ckpt / "img.png"), "--prompt",
            "What color is the circle?", "--max_new_tokens", "6", "--num_vision_tokens", "1", "--weights", "int8"]
    rc, out, _ = _run(argv)
    assert rc == 0
    im = load_inference_model(checkpoint=str(ckpt / "ckpt"), weights="int8")
    assert type(im.params["llm"]["lm_head"]["kernel"]).__name__ == "Int8Kernel"
    batch = make_batch(im.cfg, [encode_question(im, "What color is the circle?", True)],
                       [load_media(im, ckpt / "img.png")], pad_id=im.tokenizer.pad_id)
    tokens, lengths = generate(im.cfg, im.params, batch, max_new_tokens=6, eos_id=im.stop_ids,
                               num_vision_tokens=1)
    assert out == im.tokenizer.decode(trim_answer(tokens[0], lengths[0])) + "\n"


def test_interactive_multi_turn_reads_until_empty_line(ckpt):
    # Same budget / length as the compression-map test: the compiled programs are shared.
    argv = ["--checkpoint", str(ckpt / "ckpt"), "--image", str(ckpt / "img.png"), "--max_new_tokens", "6"]
    rc, out, _ = _run(argv, stdin="How many objects are there?\nWhat shape is the red object?\n\nignored\n")
    assert rc == 0
    assert len(out.splitlines()) == 2  # two answers, then the empty line ends the chat


@pytest.mark.parametrize("flag, value, message", [
    ("--image", "missing.png", "image '{root}/missing.png' does not exist"),
    ("--video", "missing.mp4", "video '{root}/missing.mp4' does not exist"),
])
def test_missing_media_file(ckpt, flag, value, message):
    rc, _, err = _run(["--checkpoint", str(ckpt / "ckpt"), flag, str(ckpt / value), "--prompt", "q"])
    assert rc == 2 and message.format(root=ckpt) in err


def test_unreadable_image_and_undecodable_video(ckpt):
    (ckpt / "bad.png").write_bytes(b"not an image")
    rc, _, err = _run(["--checkpoint", str(ckpt / "ckpt"), "--image", str(ckpt / "bad.png"), "--prompt", "q"])
    assert rc == 2 and "cannot read image" in err and "bad.png" in err
    (ckpt / "bad.mp4").write_bytes(b"not a video" * 20)
    rc, _, err = _run(["--checkpoint", str(ckpt / "ckpt"), "--video", str(ckpt / "bad.mp4"), "--prompt", "q"])
    assert rc == 2 and "cannot decode video" in err


def test_video_without_frames(ckpt):
    import av

    path = ckpt / "empty.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()  # header only: no frame is ever encoded
    rc, _, err = _run(["--checkpoint", str(ckpt / "ckpt"), "--video", str(path), "--prompt", "q"])
    assert rc == 2 and "has no frames" in err and "empty.mp4" in err


def test_unsupported_budget_names_the_supported_ones(ckpt):
    rc, _, err = _run(["--checkpoint", str(ckpt / "ckpt"), "--image", str(ckpt / "img.png"), "--prompt", "q",
                       "--num_vision_tokens", "9"])
    assert rc == 2
    assert "--num_vision_tokens 9" in err and "Supported budgets: [1, 4]" in err


def test_main_prints_errors_without_traceback(ckpt, capsys):
    rc = chat.main(["--checkpoint", str(ckpt / "nowhere"), "--image", str(ckpt / "img.png"), "--prompt", "q"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.startswith("mmlm chat: error:") and "Traceback" not in captured.err
    assert "config.json" in captured.err


def test_compression_map_file(ckpt):
    path = ckpt / "map.png"
    argv = ["--checkpoint", str(ckpt / "ckpt"), "--image", str(ckpt / "img.png"), "--prompt", "q",
            "--max_new_tokens", "6", "--save_compression_map", str(path), "--map_panel_size", "64"]
    rc, _, _ = _run(argv)
    assert rc == 0
    img = Image.open(path)
    assert img.size == (2 * 64, 2 * 64)  # 4 compressed tokens (default budget) in a 2 x 2 grid
    assert img.mode == "RGB"
    assert np.asarray(img).std() > 0


def test_compression_maps_are_the_compressor_attention(ckpt):
    """Head-wise maps, used as attention weights over the compressor's values, rebuild its output."""
    import jax.numpy as jnp

    im = load_inference_model(checkpoint=str(ckpt / "ckpt"))
    cfg, p = im.cfg, im.params
    pixels = load_media(im, ckpt / "img.png")[None]  # (1, 1, 1, 32, 32, 3)
    import jax

    model = LlavaMini(cfg)
    feats = jax.jit(lambda p, x: model.apply({"params": p}, x, method=LlavaMini.encode_images))(p, pixels)
    keys = feats[:, 0, 0]  # (1, N, Dv)
    c = p["compressor"]
    dv = keys.shape[-1]
    attn = query_attention(cfg, c, keys, 4, average_heads=False)  # (1, H, 4, N)
    x = keys.astype(jnp.float32)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    xn = (x - mu) / jnp.sqrt(var + cfg.compressor.ln_eps) * c["ln_kv"]["scale"] + c["ln_kv"]["bias"]
    v = xn @ c["in_proj_kernel"][:, 2 * dv:] + c["in_proj_bias"][2 * dv:]
    heads = cfg.compressor.heads
    vh = v.reshape(1, -1, heads, dv // heads)
    mixed = jnp.einsum("bhmn,bnhd->bmhd", attn, vh).reshape(1, 4, dv)
    rebuilt = mixed @ c["out_proj"]["kernel"] + c["out_proj"]["bias"]
    expected = jax.jit(lambda p, f: model.apply({"params": p}, f, 4, method=LlavaMini.compress))(p, feats)[:, 0]
    np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(expected), rtol=1e-4, atol=1e-5)
    maps = compression_maps(cfg, p, pixels, 4)
    assert maps.shape == (1, 1, 4, 4, 4)  # (B, F, m, g, g): 4 tokens over the 4 x 4 patch grid
    np.testing.assert_allclose(maps.sum(axis=(-1, -2)), 1.0, rtol=1e-5)
    # Matryoshka: the 1-token map is the first row of the 4-token maps.
    np.testing.assert_allclose(compression_maps(cfg, p, pixels, 1)[:, :, 0], maps[:, :, 0], rtol=1e-5)


def test_video_map_grid_and_rendering():
    assert map_grid_shape(1, 64) == (8, 8)
    assert map_grid_shape(1, 3) == (2, 2)
    assert map_grid_shape(3, 4) == (3, 4)
    maps = np.random.default_rng(0).random((3, 2, 4, 4))
    frames = [Image.new("RGB", (32, 32), (10 * i, 0, 0)) for i in range(3)]
    img = render_compression_map(frames, maps, panel_size=40)
    assert img.size == (2 * 40, 3 * 40)
