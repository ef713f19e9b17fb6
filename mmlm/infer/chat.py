"""Answers about an image or a video, streamed as they are generated: the library of `mmlm chat`
(whose command line is `mmlm.cli.chat`), also used by the notebooks.
"""

from __future__ import annotations

from typing import Callable, Sequence, TextIO

import flax.linen as nn
import jax
import numpy as np

from mmlm.errors import UserError
from mmlm.infer.loading import InferenceModel


def check_text(text: str, where: str) -> None:
    """Refuses text that is not valid Unicode (bytes that were not UTF-8 arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where} is not valid UTF-8 text (bad bytes at character {e.start}); "
                        "re-encode it as UTF-8") from None


class TextStreamer:
    """Prints the decoded text of a growing id list, only ever appending (tokenizers may merge pieces)."""

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer = tokenizer
        self.out = out
        self.ids: list[int] = []
        self.printed = ""

    def put(self, token: int) -> None:
        self.ids.append(int(token))
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids)
        # An incomplete multi-byte character decodes to U+FFFD until its last byte arrives.
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def end(self) -> str:
        self._flush(final=True)
        self.out.write("\n")
        self.out.flush()
        return self.printed


def image_features(im: InferenceModel, pixels: np.ndarray) -> jax.Array:
    """An image's ViT patch features (1, 1, K, N, Dv) for `answer(..., vision_features=...)`: a chat about one
    image runs the vision tower once, not at every turn (the features do not depend on the text)."""
    from mmlm.infer.batching import PROMPT_BUCKET, make_batch
    from mmlm.infer.generate import with_vision_features
    from mmlm.infer.loading import encode_question

    prompt = encode_question(im, "", True, [])
    batch = make_batch(im.cfg, [prompt], [pixels], pad_id=im.tokenizer.pad_id, pad_len_to=PROMPT_BUCKET)
    return with_vision_features(im.cfg, im.params, batch)["vision_features"]


def answer(im: InferenceModel, pixels, question: str, history: list[tuple[str, str]], *,
           num_vision_tokens: int | str | None, max_new_tokens: int, temperature: float, top_p: float,
           rng: jax.Array, out: TextIO, chunk_frames: int | None = None, auto_threshold: float | None = None,
           vision_features: jax.Array | None = None,
           on_budget: Callable[[int, list[float]], None] | None = None) -> str:
    """Streams the answer to `question` to `out`; returns its text.

    `pixels`: an image's (1, K, H, W, 3), or a `VideoStream` (encoded in chunks of `chunk_frames`,
    `mmlm.infer.chunked`). For an image, `vision_features` (`image_features`) skips the vision tower, and
    `num_vision_tokens="auto"` lets the confidence cascade choose the budget at `auto_threshold`
    (`mmlm.infer.cascade.cascade_prefill`: the answer continues from the prefill at the budget it stops at);
    `on_budget(budget, first-token probabilities seen)` hears its choice before the answer streams.
    """
    from mmlm.infer.batching import PROMPT_BUCKET, make_batch
    from mmlm.infer.cascade import cascade_prefill, is_auto
    from mmlm.infer.generate import sampling_params, stream, stream_decoding
    from mmlm.infer.loading import encode_question

    prompt, fuse = encode_question(im, question, True, history, return_fuse_mask=True)
    limit = int(im.max_text_len)
    if len(prompt) > limit:  # refused before anything is allocated for it
        raise UserError(f"the prompt is {len(prompt)} tokens{' with the earlier turns' if history else ''}, "
                        f"more than the model's text length of {limit} tokens (data.max_text_len); "
                        "ask a shorter question" + (" or start a new chat" if history else ""))
    streamer = TextStreamer(im.tokenizer, out)
    if not isinstance(pixels, np.ndarray):  # a video stream: chunked encoding
        from mmlm.infer.chunked import stream_video_answer

        for token in stream_video_answer(im, pixels, prompt, fuse, num_vision_tokens=num_vision_tokens,
                                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                         rng=rng, chunk_frames=chunk_frames):
            streamer.put(token)
        return streamer.end()
    # Prompt lengths rounded up to PROMPT_BUCKET so that a multi-turn chat reuses compiled programs.
    batch = make_batch(im.cfg, [prompt], [pixels], pad_id=im.tokenizer.pad_id, pad_len_to=PROMPT_BUCKET,
                       fuse_masks=[fuse])
    if vision_features is not None:
        batch["vision_features"] = vision_features
    if is_auto(num_vision_tokens):
        sp, greedy = sampling_params(temperature, top_p, im.stop_ids)
        chosen = cascade_prefill(im.cfg, im.params, batch, auto_threshold, sp, rng, max_new_tokens=max_new_tokens,
                                 greedy=greedy)
        if on_budget is not None:
            on_budget(chosen.budget, chosen.confidences)
        steps = stream_decoding(im.cfg, nn.unbox(im.params), chosen.state, sp, greedy=greedy)
    else:
        steps = stream(im.cfg, im.params, batch, max_new_tokens=max_new_tokens, eos_id=im.stop_ids,
                       num_vision_tokens=num_vision_tokens, temperature=temperature, top_p=top_p, rng=rng)
    stops = set(im.stop_ids)
    for tokens in steps:
        token = int(tokens[0])
        if token in stops:
            break
        streamer.put(token)
    return streamer.end()


def check_question(question: str, history: Sequence[tuple[str, str]]) -> None:
    """Refuses media markers the prompt cannot place: the media come once, before the first question."""
    from mmlm.data.templates import count_markers

    n = count_markers(question)
    if n and history:
        raise UserError("<image>/<video> in a follow-up question: the image or video was given with "
                        "--image/--video and stays in the chat; type the question without the marker")
    if n > 1:
        raise UserError(f"the question holds {n} <image>/<video> markers; one chat has one image or video, "
                        "placed where the (single) marker is or before the question")

