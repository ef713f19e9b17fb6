"""Chunked video encoding and chunked prefill: long videos with memory bounded by the LLM's cache.

The one-batch path (`generate.prefill`) runs the vision tower, compressor and
pre-fusion over all F frames of a video at once: pixels and patch features of
the whole video live on the device, and the host holds every decoded frame.
Here the frames come as a stream (`mmlm.infer.video_stream.VideoStream`) in
chunks of C frames, and

1. **encode** (`encode_video`): one compiled program per chunk size runs
   `LlavaMini.vision_and_text` over a chunk (the last one zero-padded, its
   padded frames masked) and keeps only what the LLM reads: each frame's m
   tokens (`(B, C*m, D)`, N patch tokens per frame for the LLaVA-1.5
   baseline) and the sum over the chunk's real frames of the fused text.
   This is exact: pre-fusion runs per frame (each frame's vision tokens with
   the instruction text, `(B*F, P+T, D)`), and the LLM's text is the mean of
   the per-frame fused text over real frames, which the chunks' sums
   divided by F rebuild.
2. **prefill** (`prefill_video`): the vision tokens replace the prompt's
   `<image>` placeholder (`merge_vision_into_text`, left-aligned as in
   `generate.prefill`), and the LLM runs over the prompt in chunks of
   at most `prefill_chunk` tokens (equal chunks; one compiled program, the
   cache donated and written in place) into a KV cache sized to the prompt
   (plus fewer padding slots than chunks) + the answer, so attention scores are `chunk x prompt`, not
   `prompt x prompt`. Samples answer token 0.
3. **decode**: `generate.decode_step`, as for any prompt.

Host memory holds one chunk of pixels; device memory the weights, one chunk's
activations, the F*m vision tokens and the cache. Chunked and one-batch answers
agree to float rounding (tests/test_long_video.py pins 1e-5 on the logits).

`stream_video_answer` is the entry point for a caller with an
`InferenceModel` (chat, a server): a video path and prompt ids in, answer
token ids out as they are generated. `generate_videos` answers a batch of
questions, each about its own video (`mmlm eval`).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmlm import IMAGE_TOKEN_ID
from mmlm.errors import UserError
from mmlm.infer.video_stream import VideoStream
from mmlm.infer.generate import DecodeState, SamplingParams, sampling_params, start_decoding, stream_decoding
from mmlm.models.config import ModelConfig
from mmlm.models.llama import init_cache
from mmlm.models.llava_mini import LlavaMini, merge_vision_into_text

Batch = dict[str, Any]
Params = Any


class EncodedVideo(NamedTuple):
    """What the LLM reads of a video (device arrays), for B prompts.

    vision: (B, V, D) vision tokens, V = chunks * C * tokens per frame; vision_valid: (B, V) (False for the
    padded frames of the last chunk); text_sum: (B, T, D) float32, the fused instruction text summed over
    real frames (None when the model's LLM reads the raw text embeddings); frames: (B,) real frame counts.
    """

    vision: jax.Array
    vision_valid: jax.Array
    text_sum: jax.Array | None
    frames: np.ndarray | jax.Array


def reads_fused_text(cfg: ModelConfig) -> bool:
    """Whether the LLM reads pre-fusion's text (LLaVA-Mini with pre-fusion layers) or the raw embeddings."""
    return cfg.mode == "llava_mini" and cfg.prefusion_layers > 0


def text_batch(prompts: Sequence[Sequence[int]], fuse_masks: Sequence[Sequence[bool] | None] | None = None, *,
               pad_id: int, pad_len_to: int = 32) -> dict[str, np.ndarray]:
    """Right-padded prompt ids: input_ids, attention_mask, fuse_mask (B, T), T a multiple of `pad_len_to`.

    Each prompt holds one `IMAGE_TOKEN_ID` where the video goes; a None fuse mask fuses every prompt token
    but the placeholder (a single-turn prompt), as `mmlm.infer.batching.make_batch`.
    """
    b = len(prompts)
    t = max(len(p) for p in prompts)
    t = -(-t // pad_len_to) * pad_len_to
    ids = np.full((b, t), pad_id, np.int32)
    mask = np.zeros((b, t), bool)
    fuse = np.zeros((b, t), bool)
    for j, p in enumerate(prompts):
        if sum(1 for x in p if x == IMAGE_TOKEN_ID) != 1:
            raise ValueError(f"prompt {j} needs exactly one video placeholder")
        n = len(p)
        ids[j, :n], mask[j, :n] = p, True
        row = None if fuse_masks is None else fuse_masks[j]
        fuse[j, :n] = np.asarray(p) != IMAGE_TOKEN_ID if row is None else np.asarray(row, bool)
    return {"input_ids": ids, "attention_mask": mask, "fuse_mask": fuse}


# ------------------------------------------------------------------------------ encode

def _encode_chunk(cfg: ModelConfig, params: Params, batch: Batch, num_tokens: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One chunk: batch = text (B, T) + images (B, C, K, H, W, 3) + frame_mask (B, C) ->
    tokens (B, C*m, D), their validity (B, C*m), fused text summed over the chunk's real frames (B, T, D) fp32."""
    tokens, valid, text = LlavaMini(cfg).apply({"params": params}, batch, num_tokens,
                                               method=LlavaMini.vision_and_text)
    # vision_and_text averages the text over the chunk's real frames; the sum is what adds up across chunks.
    n = batch["frame_mask"].sum(axis=1).astype(jnp.float32)
    return tokens, valid, text.astype(jnp.float32) * n[:, None, None]


encode_chunk_jit = jax.jit(_encode_chunk, static_argnames=("cfg", "num_tokens"))


def encode_video(cfg: ModelConfig, params: Params, text: Batch, chunks: Iterable[tuple[np.ndarray, int]],
                 num_tokens: int) -> EncodedVideo:
    """Encodes one video, chunk by chunk, for the prompts of `text` (B rows, usually 1).

    chunks: (pixels (C, K, H, W, 3), real frame count) with a fixed C (`VideoStream.chunks`); every row
    reads the same video (pre-fusion fuses it with each row's own text). Pixels go to the device one chunk
    at a time.
    """
    params = nn.unbox(params)
    b = text["input_ids"].shape[0]
    tokens, valids, text_sum, frames = [], [], None, 0
    for pixels, count in chunks:
        c = pixels.shape[0]
        mask = np.zeros((b, c), bool)
        mask[:, :count] = True
        batch = {**text, "images": np.broadcast_to(pixels[None], (b,) + pixels.shape), "frame_mask": mask}
        tok, valid, s = encode_chunk_jit(cfg, params, batch, num_tokens=num_tokens)
        tokens.append(tok)
        valids.append(valid)
        text_sum = s if text_sum is None else text_sum + s
        frames += count
    if not tokens:
        raise ValueError("the video has no frames")
    # The last chunk's padded frames are dropped: the cache holds real frames only.
    keep = frames * (tokens[0].shape[1] // pixels.shape[0])  # real frames x tokens per frame
    return EncodedVideo(vision=jnp.concatenate(tokens, axis=1)[:, :keep],
                        vision_valid=jnp.concatenate(valids, axis=1)[:, :keep],
                        text_sum=text_sum if reads_fused_text(cfg) else None, frames=np.full((b,), frames))


def stack_videos(videos: Sequence[EncodedVideo]) -> EncodedVideo:
    """Rows of several single-row encodings in one batch, vision tokens padded (invalid) to the longest."""
    v = max(e.vision.shape[1] for e in videos)
    pad = lambda a: jnp.pad(a, [(0, 0), (0, v - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    sums = [e.text_sum for e in videos]
    return EncodedVideo(vision=jnp.concatenate([pad(e.vision) for e in videos]),
                        vision_valid=jnp.concatenate([pad(e.vision_valid) for e in videos]),
                        text_sum=None if sums[0] is None else jnp.concatenate(sums),
                        frames=np.concatenate([e.frames for e in videos]))


# ------------------------------------------------------------------------------ prefill

def _prefill_inputs(cfg: ModelConfig, params: Params, text: Batch, video: EncodedVideo, *, max_new_tokens: int,
                    prefill_chunk: int) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    """The LLM's prompt and an empty cache: embeds (B, P, D), positions (B, P), key_valid (B, P + max_new_tokens),
    the zeroed KV cache; P = T - 1 + V left-aligned tokens, padded in front to equal chunks (`prefill_chunking`)."""
    model = LlavaMini(cfg)
    variables = {"params": params}
    ids, attn = text["input_ids"], text["attention_mask"]
    if video.text_sum is not None:
        frames = jnp.maximum(jnp.asarray(video.frames, jnp.float32), 1.0)
        words = (video.text_sum / frames[:, None, None]).astype(cfg.compute_dtype)
    else:
        words = model.apply(variables, ids, method=LlavaMini.embed_text)
    has_media = jnp.any(ids == cfg.image_token_id, axis=1)
    placeholder = jnp.argmax(ids == cfg.image_token_id, axis=1)
    inputs = merge_vision_into_text(words, attn, has_media, placeholder, video.vision, video.vision_valid,
                                    align="left")
    embeds, valid, positions = inputs["embeds"], inputs["valid"], inputs["positions"]
    b, p = valid.shape
    size, n = prefill_chunking(p, prefill_chunk)
    front = size * n - p  # left padding (< n slots): the last chunk ends at the last prompt token
    embeds = jnp.pad(embeds, ((0, 0), (front, 0), (0, 0)))
    valid = jnp.pad(valid, ((0, 0), (front, 0)))
    positions = jnp.pad(positions, ((0, 0), (front, 0)))
    cache = init_cache(cfg.llm, b, p + front + max_new_tokens, cfg.compute_dtype, per_layer=not cfg.scan_layers)
    key_valid = jnp.concatenate([valid, jnp.zeros((b, max_new_tokens), bool)], axis=1)
    return embeds, positions, key_valid, cache


prefill_inputs_jit = jax.jit(_prefill_inputs, static_argnames=("cfg", "max_new_tokens", "prefill_chunk"))


def prefill_chunking(prompt: int, prefill_chunk: int) -> tuple[int, int]:
    """(chunk size, chunks) for a prompt of `prompt` tokens: the fewest chunks of at most `prefill_chunk`
    tokens, of equal size, so that padding the prompt to size x chunks adds fewer slots than there are chunks."""
    n = -(-prompt // prefill_chunk)
    return -(-prompt // n), n


def _llm_chunk(model: LlavaMini, embeds, positions, key_valid, cache, start):
    hidden, cache = model.llm(embeds, positions, key_valid, cache=cache, cache_index=start, return_hidden=True)
    return hidden[:, -1], cache


def _prefill_chunk(cfg: ModelConfig, params: Params, embeds: jax.Array, positions: jax.Array, key_valid: jax.Array,
                   cache: Any, start: jax.Array, *, size: int) -> tuple[jax.Array, Any]:
    """Prompt slots [start, start + size) through the LLM into the cache (their queries attend causally to the
    valid slots so far): the last slot's final hidden state (B, D) and the cache."""
    chunk = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)
    return LlavaMini(cfg).apply({"params": params}, chunk(embeds), chunk(positions), key_valid, cache, start,
                                method=_llm_chunk)


# The cache is donated: each chunk writes its slots in place (one cache alive, not two).
prefill_chunk_jit = jax.jit(_prefill_chunk, static_argnames=("cfg", "size"), donate_argnames=("cache",))


def _last_logits(model: LlavaMini, hidden):
    return model.llm.logits(hidden).astype(jnp.float32)


def _first_token(cfg: ModelConfig, params: Params, last: jax.Array, cache: Any, key_valid: jax.Array,
                 sp: SamplingParams, rng: jax.Array, *, max_new_tokens: int, greedy: bool
                 ) -> tuple[DecodeState, jax.Array]:
    logits = LlavaMini(cfg).apply({"params": params}, last, method=_last_logits)
    prompt_valid = key_valid[:, : key_valid.shape[1] - max_new_tokens].sum(axis=1)
    state = start_decoding(logits, cache, key_valid, prompt_valid, sp, rng, max_new_tokens=max_new_tokens,
                           greedy=greedy)
    return state, logits


first_token_jit = jax.jit(_first_token, static_argnames=("cfg", "max_new_tokens", "greedy"),
                          donate_argnames=("cache",))


def prefill_video(cfg: ModelConfig, params: Params, text: Batch, video: EncodedVideo, sp: SamplingParams,
                  rng: jax.Array, *, max_new_tokens: int, prefill_chunk: int, greedy: bool
                  ) -> tuple[DecodeState, jax.Array]:
    """Prompt + encoded video -> the decoding state after answer token 0, and its logits (B, V) fp32.

    The prompt P = T - 1 + V tokens is left-aligned (as `generate.prefill`), padded in front to n equal
    chunks of at most `prefill_chunk` tokens (`prefill_chunking`) and run through the LLM chunk by chunk from a host loop (`prefill_chunk_jit`, one
    compiled program, the cache donated and updated in place): each chunk's queries attend to the cache so
    far, causally, over the valid slots. The cache holds P (rounded up) + max_new_tokens slots.
    """
    params = nn.unbox(params)
    embeds, positions, key_valid, cache = prefill_inputs_jit(cfg, params, text, video, max_new_tokens=max_new_tokens,
                                                             prefill_chunk=prefill_chunk)
    p = embeds.shape[1]  # already a multiple of the chunk size
    size, _ = prefill_chunking(p, prefill_chunk)
    last = None
    for start in range(0, p, size):
        last, cache = prefill_chunk_jit(cfg, params, embeds, positions, key_valid, cache,
                                        jnp.asarray(start, jnp.int32), size=size)
    return first_token_jit(cfg, params, last, cache, key_valid, sp, rng, max_new_tokens=max_new_tokens,
                           greedy=greedy)


# ------------------------------------------------------------------------------ generation

def stream_encoded(cfg: ModelConfig, params: Params, text: Batch, video: EncodedVideo, *, max_new_tokens: int,
                   eos_id: int | Sequence[int], prefill_chunk: int, temperature: float = 0.0, top_p: float = 1.0,
                   rng: jax.Array | None = None) -> Iterator[np.ndarray]:
    """Answers for an encoded video, one step at a time: yields each step's tokens (B,) (as `generate.stream`).

    Stops when every row has produced a stop token (which is yielded) or after `max_new_tokens` tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    sp, greedy = sampling_params(temperature, top_p, eos_id)
    params = nn.unbox(params)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    state, _ = prefill_video(cfg, params, text, video, sp, rng, max_new_tokens=max_new_tokens,
                                 prefill_chunk=prefill_chunk, greedy=greedy)
    yield from stream_decoding(cfg, params, state, sp, greedy=greedy)


def generate_encoded(cfg: ModelConfig, params: Params, text: Batch, video: EncodedVideo, *, max_new_tokens: int,
                     eos_id: int | Sequence[int], prefill_chunk: int, pad_id: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy answers for B prompts over their encoded videos: tokens (B, max_new_tokens), lengths (B,),
    as `generate.generate` returns them."""
    sp, _ = sampling_params(0.0, 1.0, eos_id, pad_id)
    b = text["input_ids"].shape[0]
    tokens = np.full((b, max_new_tokens), int(sp.pad_id), np.int32)
    lengths = np.zeros((b,), np.int32)
    done = np.zeros((b,), bool)
    stops = np.asarray(sp.stop_ids)
    for i, step in enumerate(stream_encoded(cfg, params, text, video, max_new_tokens=max_new_tokens,
                                            eos_id=eos_id, prefill_chunk=prefill_chunk)):
        step = np.where(done, int(sp.pad_id), step)
        tokens[:, i] = step
        done |= np.isin(step, stops)
        lengths += ~done
    return tokens, lengths


def stream_video_answer(im, video: str | os.PathLike | VideoStream, prompt: Sequence[int], fuse_mask: Sequence[bool] | None = None,
                        *, num_vision_tokens: int | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
                        top_p: float = 1.0, rng: jax.Array | None = None, fps: float | None = None,
                        max_frames: int | None = None, chunk_frames: int | None = None,
                        prefill_chunk: int | None = None) -> Iterator[int]:
    """Answer token ids for one question about a video file, streamed as they are generated.

    Args:
      im: an `mmlm.infer.loading.InferenceModel`.
      video: the video file (or an opened `VideoStream`, whose fps and cap then apply); frames are sampled at `fps` (default: the model's data.video_fps) and decoded
        as a stream, `chunk_frames` at a time (default: data.video_chunk_frames).
      prompt, fuse_mask: the question's ids with one placeholder (`loading.encode_question`) and its fuse mask.
      max_frames: optional cap on the sampled frames (default: none, the whole video).
      prefill_chunk: LLM prefill chunk in tokens (default: data.prefill_chunk_tokens).

    Yields ids up to, not including, a stop token. Raises `UserError` for an unreadable video.
    """
    m = im.budget(num_vision_tokens)
    if chunk_frames is not None and chunk_frames < 1:
        raise UserError(f"--video_chunk_frames must be >= 1, got {chunk_frames}")
    stream = video if isinstance(video, VideoStream) else open_video(im, video, fps=fps, max_frames=max_frames)
    text = text_batch([prompt], [fuse_mask], pad_id=im.tokenizer.pad_id)
    encoded = encode_video(im.cfg, im.params, text, stream.chunks(chunk_frames or im.video_chunk_frames), m)
    stops = set(im.stop_ids)
    for step in stream_encoded(im.cfg, im.params, text, encoded, max_new_tokens=max_new_tokens, eos_id=im.stop_ids,
                               prefill_chunk=prefill_chunk or im.prefill_chunk_tokens, temperature=temperature,
                               top_p=top_p, rng=rng):
        token = int(step[0])
        if token in stops:
            return
        yield token


def open_video(im, path: str | os.PathLike, *, fps: float | None = None, max_frames: int | None = None
               ) -> VideoStream:
    """A `VideoStream` with the model's preprocessing (image size, HD grid, normalisation) and sampling rate."""
    return VideoStream(path, image_size=im.image_size, fps=fps or im.video_fps, max_frames=max_frames,
                       hd_grid=im.hd_grid, mean=im.image_mean, std=im.image_std)


def generate_videos(im, prompts: Sequence[Sequence[int]], videos: Sequence[VideoStream], *,
                    num_vision_tokens: int | None, max_new_tokens: int, chunk_frames: int | None = None,
                    prefill_chunk: int | None = None, pad_len_to: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Greedy answers to B questions, each about its own video: tokens (B, max_new_tokens), lengths (B,).

    Each video is streamed and encoded chunk by chunk with its own question's text (pre-fusion reads it);
    the LLM then prefills and decodes all B rows as one batch (vision tokens padded to the longest video).
    """
    m = im.budget(num_vision_tokens)
    text = text_batch(prompts, pad_id=im.tokenizer.pad_id, pad_len_to=pad_len_to)
    size = chunk_frames or im.video_chunk_frames
    encoded = [encode_video(im.cfg, im.params, {k: a[j:j + 1] for k, a in text.items()}, v.chunks(size), m)
               for j, v in enumerate(videos)]
    return generate_encoded(im.cfg, im.params, text, stack_videos(encoded), max_new_tokens=max_new_tokens,
                            eos_id=im.stop_ids, prefill_chunk=prefill_chunk or im.prefill_chunk_tokens,
                            pad_id=im.tokenizer.pad_id)
