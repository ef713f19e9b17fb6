"""Long video: the streaming frame decoder, chunked encoding == one batch, `mmlm chat --video` with chunks."""

from __future__ import annotations

import importlib.util
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmlm.checkpoint import save_model
from mmlm.config_utils import load_config
from mmlm.data import preprocess
from mmlm.errors import UserError
from mmlm.cli import chat
from mmlm.infer.batching import make_batch
from mmlm.infer.chunked import encode_video, generate_encoded, prefill_video, text_batch
from mmlm.infer.generate import prefill_llm, decoding_layout, generate, init_cache, sampling_params, trim_answer
from mmlm.infer.loading import encode_question, load_inference_model, load_media
from mmlm.infer.random_model import random_params
from mmlm.infer.video_stream import VideoStream
from mmlm.models.config import model_config_from_dict
from mmlm.models.llava_mini import LlavaMini


def write_video(path, frames: int, fps: float, size: int = 48, seed: int = 0) -> None:
    """A small random-coloured MPEG-4 video made with PyAV (each frame a different colour + noise)."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=int(fps) if float(fps).is_integer() else fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8)
            img[: size // 2, : size // 2] = rng.integers(0, 255, (size // 2, size // 2, 3))
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random checkpoint and two videos: 20 frames at 4 fps (5 s) and 7 frames at 1 fps."""
    root = tmp_path_factory.mktemp("long_video")
    config = load_config("configs/tiny.py")
    cfg = model_config_from_dict(config.model)
    save_model(str(root / "ckpt"), random_params(cfg, seed=3), config)
    write_video(root / "v4fps.mp4", 20, 4)
    write_video(root / "v1fps.mp4", 7, 1, seed=1)
    return root


def test_stream_samples_at_fps_like_decode_video(tiny):
    im = load_inference_model(checkpoint=str(tiny / "ckpt"))
    path = tiny / "v4fps.mp4"
    for fps, cap, want in ((1.0, None, 5), (2.0, None, 10), (4.0, None, 20), (2.0, 3, 3)):
        s = VideoStream(path, image_size=32, fps=fps, max_frames=cap)
        assert len(s) == want
        frames = list(s)
        assert len(frames) == want
        ref = preprocess.decode_video(path, max_frames=cap or 10**6, target_fps=fps)
        np.testing.assert_array_equal([f.index for f in frames], ref.indices)
        np.testing.assert_allclose([f.time for f in frames], ref.times)
        # Exactly the pixels of the one-batch loader (decode_video + preprocess_frames).
        pixels = np.stack([f.pixels for f in frames])
        old, count = preprocess.preprocess_frames(ref.frames, len(ref.frames), 32, 1, im.image_mean, im.image_std)
        np.testing.assert_array_equal(pixels, old[:count])
    s = VideoStream(path, image_size=32, fps=1.0)
    np.testing.assert_allclose(s.times, [0.5, 1.5, 2.5, 3.5, 4.5])  # the middle of each 1 s segment
    chunks = list(s.chunks(2))
    assert [n for _, n in chunks] == [2, 2, 1] and all(c.shape == (2, 1, 32, 32, 3) for c, _ in chunks)
    assert not chunks[-1][0][1].any()  # the padded frame is zero


def test_stream_errors_are_user_errors(tiny):
    (tiny / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(UserError, match="cannot decode video"):
        VideoStream(tiny / "bad.mp4", image_size=32)
    with pytest.raises(UserError, match="--fps"):
        VideoStream(tiny / "v1fps.mp4", image_size=32, fps=0)


def _one_batch_logits(cfg, params, prompt, pixels, pad_id, max_new):
    batch = make_batch(cfg, [prompt], [pixels], pad_id=pad_id, pad_len_to=32)
    model = LlavaMini(cfg)
    v = {"params": params}
    inputs = model.apply(v, batch, None, "left", method=LlavaMini.build_llm_inputs)
    b, p = inputs["valid"].shape
    cache = init_cache(cfg.llm, b, p + max_new, cfg.compute_dtype, per_layer=not cfg.scan_layers)
    key_valid = jnp.concatenate([inputs["valid"], jnp.zeros((b, max_new), bool)], axis=1)
    logits, _ = model.apply(v, inputs["embeds"], inputs["positions"], key_valid, cache, method=prefill_llm)
    return batch, logits


@pytest.mark.parametrize("overrides", [(), ("--config.model.mode=llava15",)], ids=["llava_mini", "llava15"])
def test_chunked_equals_one_batch(tiny, overrides):
    """7 frames in chunks of 3 (the last padded), the LLM prefill in chunks of 16 tokens: same logits, same answer."""
    config = load_config("configs/tiny.py", list(overrides))
    cfg = model_config_from_dict(config.model)
    cfg, params = decoding_layout(cfg, random_params(cfg, seed=5))
    im = load_inference_model(checkpoint=str(tiny / "ckpt"))
    pixels = load_media(im, tiny / "v1fps.mp4", "video", max_frames=100)
    assert pixels.shape[0] == 7
    prompt = encode_question(im, "<video>\nWhat happens in the video?", True)
    pad = im.tokenizer.pad_id
    batch, want = _one_batch_logits(cfg, params, prompt, pixels, pad, 8)

    text = text_batch([prompt], pad_id=pad)
    chunks = [(np.concatenate([pixels[i:i + 3], np.zeros((3 - len(pixels[i:i + 3]),) + pixels.shape[1:],
                                                             np.float32)]), len(pixels[i:i + 3]))
              for i in range(0, 7, 3)]
    m = cfg.check_budget(None)
    video = encode_video(cfg, params, text, chunks, m)
    sp, greedy = sampling_params(0.0, 1.0, im.stop_ids)
    _, got = prefill_video(cfg, params, text, video, sp, jax.random.PRNGKey(0), max_new_tokens=8,
                           prefill_chunk=16, greedy=greedy)
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)

    tokens, lengths = generate(cfg, params, batch, max_new_tokens=8, eos_id=im.stop_ids)
    tokens2, lengths2 = generate_encoded(cfg, params, text, video, max_new_tokens=8, eos_id=im.stop_ids,
                                         prefill_chunk=16)
    assert trim_answer(tokens[0], lengths[0]) == trim_answer(tokens2[0], lengths2[0])


def _chat(argv):
    out, err = io.StringIO(), io.StringIO()
    rc = chat.run(chat.build_parser().parse_args(argv), stdin=io.StringIO(""), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def test_chat_video_chunked_answers_like_one_batch(tiny):
    """`mmlm chat --video` with 2-frame chunks: all 7 frames (no cap), the one-batch path's greedy answer."""
    ckpt, video = str(tiny / "ckpt"), str(tiny / "v1fps.mp4")
    rc, out, err = _chat(["--checkpoint", ckpt, "--video", video, "--prompt", "What is shown?",
                          "--max_new_tokens", "6", "--video_chunk_frames", "2", "--fps", "1"])
    assert rc == 0 and "7 frames" in err
    im = load_inference_model(checkpoint=ckpt)
    pixels = load_media(im, video, "video", max_frames=100)
    prompt = encode_question(im, "What is shown?", True)
    batch = make_batch(im.cfg, [prompt], [pixels], pad_id=im.tokenizer.pad_id)
    tokens, lengths = generate(im.cfg, im.params, batch, max_new_tokens=6, eos_id=im.stop_ids)
    assert out == im.tokenizer.decode(trim_answer(tokens[0], lengths[0])) + "\n"
    # --max_frames caps, --fps resamples.
    rc, _, err = _chat(["--checkpoint", ckpt, "--video", video, "--prompt", "Q?", "--max_new_tokens", "2",
                        "--max_frames", "3"])
    assert rc == 0 and "3 frames" in err
    rc, _, err = _chat(["--checkpoint", ckpt, "--video", str(tiny / "v4fps.mp4"), "--prompt", "Q?",
                        "--max_new_tokens", "2", "--fps", "2"])
    assert rc == 0 and "10 frames" in err
    with pytest.raises(SystemExit) as exit_info:  # a flag out of its range is an argparse error
        _chat(["--checkpoint", ckpt, "--video", video, "--prompt", "Q?", "--video_chunk_frames", "0"])
    assert exit_info.value.code == 2


def test_eval_encodes_each_video_in_chunks_and_batches_the_llm(tiny):
    """`evaluate` over two videos of different lengths in one batch, 2-frame chunks: each answer equals the
    one-batch greedy answer to its question alone."""
    from mmlm.eval.evaluate import evaluate, prepare_questions

    im = load_inference_model(checkpoint=str(tiny / "ckpt"))
    rows = [{"question_id": "a", "video": "v1fps.mp4", "text": "What is shown?"},
            {"question_id": "b", "video": "v4fps.mp4", "text": "Which colour comes first?"}]
    questions = prepare_questions(im, rows, tiny, None)
    result = evaluate(im, questions, [None], batch_size=4, max_new_tokens=5, max_frames=6, progress=False,
                      video_chunk_frames=2)
    got = {line["question_id"]: line["text"] for line in result.answers[im.budget(None)]}
    for q in questions:
        pixels = load_media(im, q.media, "video", max_frames=6)
        batch = make_batch(im.cfg, [q.prompt], [pixels], pad_id=im.tokenizer.pad_id)
        tokens, lengths = generate(im.cfg, im.params, batch, max_new_tokens=5, eos_id=im.stop_ids)
        assert got[q.record["question_id"]] == im.tokenizer.decode(trim_answer(tokens[0], lengths[0])).strip()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install mmlm[tpu])")
def test_compile_infer_frames_for_a_tpu_chip(capsys):
    """`mmlm compile --what infer --frames N` on the tiny config: the three chunked programs compile for a
    v5e chip, and the KV cache holds the prompt (text + N frames x m tokens, the last vision chunk padded) and
    the answer."""
    import json

    from mmlm.cli import compile as compile_cli

    assert compile_cli.main(["--config", "tiny", "--topology", "v5litepod-1", "--what", "infer", "--frames", "50",
                             "--new_tokens", "8", "--json", "--config.data.video_chunk_frames=16"]) == 0
    r = json.loads(capsys.readouterr().out)
    row = r["models"][0]
    cfg = model_config_from_dict(load_config("configs/tiny.py").model)
    m = cfg.check_budget(None)
    assert row["llm_prompt_tokens"] == 24 - 1 + 50 * m
    assert row["kv_cache_slots"] == 24 - 1 + 50 * m + 8  # the prompt and the answer: no padded frame
    llm = cfg.llm
    assert row["kv_cache_bytes"] == llm.layers * 2 * row["kv_cache_slots"] * llm.kv_heads * llm.head_dim * 2
    assert r["fits"] and row["serving_bytes"] >= row["params_bytes"] + row["kv_cache_bytes"]
    # The prefill chunk updates the donated cache in place: aliased, not copied.
    assert row["prefill_chunk"]["per_chip_bytes"]["aliased"] >= row["kv_cache_bytes"]  # TPU tiles pad tiny dims
    for name in ("encode_chunk", "prefill_inputs", "prefill_chunk", "decode_step"):
        assert row[name]["per_chip_bytes"]["total"] > 0


@pytest.mark.parametrize("flag,value", [("--video_chunk_frames", "0"), ("--fps", "0"), ("--max_frames", "0")])
def test_eval_video_flags_are_checked(tiny, tmp_path, capsys, flag, value):
    from mmlm.cli import eval as cli

    data = tmp_path / "q.jsonl"
    data.write_text('{"question_id": "a", "video": "v1fps.mp4", "text": "Q?"}\n')
    with pytest.raises(SystemExit) as exit_info:  # a flag out of its range is an argparse error
        cli.main(["--checkpoint", str(tiny / "ckpt"), "--data", str(data), "--images", str(tiny),
                  "--out", str(tmp_path / "out"), flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_chat_video_multi_turn_streams_the_video_per_question(tiny):
    """Interactive chat about a video: each question re-reads the video (pre-fusion fuses it with that
    question) and is answered; an empty line ends the chat."""
    out, err = io.StringIO(), io.StringIO()
    args = chat.build_parser().parse_args(["--checkpoint", str(tiny / "ckpt"), "--video", str(tiny / "v1fps.mp4"),
                                      "--max_new_tokens", "3", "--video_chunk_frames", "4"])
    assert chat.run(args, stdin=io.StringIO("What is shown?\nAnd then?\n\n"), out=out, err=err) == 0
    assert len(out.getvalue().splitlines()) == 2
