"""`mmlm chat`: ask a model about an image or a video; answers stream as they are generated.

    mmlm chat --workdir /tmp/demo --image cat.png --prompt "What color is the circle?"
    mmlm chat --checkpoint ckpt/ --video clip.mp4            # interactive, multi-turn
    mmlm chat --workdir W --image x.png --num_vision_tokens 4 --save_compression_map map.png

With `--prompt` it answers once and exits; otherwise it reads questions from
stdin (an empty line or EOF ends the chat; earlier turns stay in the context).
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable, Sequence, TextIO

import jax
import numpy as np

from mmlm.cli_common import SEED, check_output_file, number, run_command
from mmlm.errors import UserError
from mmlm.infer.cascade import DEFAULT_THRESHOLD, budget_arg
from mmlm.infer.loading import InferenceModel


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmlm chat",
        description="Ask a model about an image or a video. One answer with --prompt, an interactive "
                    "multi-turn chat otherwise. Answers stream to stdout as they are generated.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (latest checkpoint + config.json)")
    src.add_argument("--checkpoint", help="model checkpoint directory (config.json + params/)")
    p.add_argument("--step", type=number(int, 0), default=None, help="with --workdir: checkpoint step (default: latest)")
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", help="image file (any format PIL reads)")
    media.add_argument("--video", help="video file, any length: frames sampled at --fps are decoded as a stream and "
                                       "encoded --video_chunk_frames at a time")
    p.add_argument("--prompt", default=None, help="question; without it, questions are read interactively")
    p.add_argument("--num_vision_tokens", type=budget_arg, default=None,
                   help="vision tokens per image/frame (a budget the model supports; default: the model's), or "
                        "'auto': a Matryoshka model answers at its smallest budget and escalates while the first "
                        "answer token's probability is below --auto_threshold (it says which budget it used)")
    p.add_argument("--auto_threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"with --num_vision_tokens auto: the probability in (0, 1) below which it escalates "
                        f"(default {DEFAULT_THRESHOLD}; `mmlm eval --calibration_data` calibrates one)")
    p.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 = greedy (default), > 0 samples")
    p.add_argument("--top_p", type=number(float, 0, 1, low_open=True), default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--max_new_tokens", type=number(int, 1), default=128, help="answer length limit (default 128)")
    p.add_argument("--seed", type=SEED, default=0, help="sampling seed (default 0)")
    p.add_argument("--max_frames", type=number(int, 1), default=None,
                   help="optional cap on the sampled video frames (default: none, the whole video)")
    p.add_argument("--fps", type=number(float, 0, low_open=True), default=None,
                   help="video sampling rate in frames per second (default: the model's data.video_fps, 1)")
    p.add_argument("--video_chunk_frames", type=number(int, 1), default=None,
                   help="frames the vision tower, compressor and pre-fusion encode at once (one compiled program "
                        "per size; default: the model's data.video_chunk_frames, 16)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the one in the model's config)")
    p.add_argument("--template", default=None, help="conversation template (default: the model's)")
    p.add_argument("--weights", default="float", choices=("float", "int8"),
                   help="LLM weights: 'float' as stored (default) or 'int8' (LLM and pre-fusion kernels as int8 with a per-channel scale: about half the memory, answers close to the float model's)")
    p.add_argument("--save_compression_map", metavar="OUT.png", default=None,
                   help="write the image with each compressed token's attention over the patches (never over "
                        "an input; an existing file only with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --save_compression_map replace an existing file (replaced once the new one is complete)")
    p.add_argument("--map_panel_size", type=number(int, 16), default=224, help="pixels per compression-map panel")
    return p


def _validate_args(args: argparse.Namespace) -> None:
    """Cheap checks before anything heavy is loaded."""
    from mmlm.infer.loading import check_file

    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError(f"--max_frames must be >= 1, got {args.max_frames}")
    if args.fps is not None and not args.fps > 0:
        raise UserError(f"--fps must be > 0 frames per second, got {args.fps}")
    if args.video_chunk_frames is not None and args.video_chunk_frames < 1:
        raise UserError(f"--video_chunk_frames must be >= 1, got {args.video_chunk_frames}")
    if args.num_vision_tokens == "auto":
        from mmlm.infer.cascade import check_threshold

        check_threshold(args.auto_threshold)
        if args.video is not None:
            raise UserError("--num_vision_tokens auto answers questions about an --image; for a --video give a "
                            "budget (or leave --num_vision_tokens out for the model's default)")
    if args.map_panel_size < 16:
        raise UserError(f"--map_panel_size must be >= 16 pixels, got {args.map_panel_size}")
    if args.image is not None:
        check_file(args.image, "image")
    else:
        check_file(args.video, "video")
    if args.prompt is not None:
        check_text(args.prompt, "--prompt")
        if not args.prompt.strip():
            raise UserError("--prompt is empty; give a question or leave --prompt out for an interactive chat")
    if args.save_compression_map:
        from mmlm.safe_io import check_not_input, refuse_existing

        check_output_file(args.save_compression_map, "--save_compression_map")
        check_not_input(args.save_compression_map, "--save_compression_map",
                        {"--image": args.image, "--video": args.video, "--workdir": args.workdir,
                         "--checkpoint": args.checkpoint, "--tokenizer": args.tokenizer})
        refuse_existing(args.save_compression_map, "--save_compression_map", args.overwrite)


def check_text(text: str, where: str) -> None:
    """Refuses text that is not valid Unicode (bytes that were not UTF-8 arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where} is not valid UTF-8 text (bad bytes at character {e.start}); "
                        "re-encode it as UTF-8") from None


def _check_budget_early(args: argparse.Namespace) -> None:
    """Rejects an unsupported --num_vision_tokens from config.json alone (before loading weights)."""
    from mmlm.checkpoint import load_config_json
    from mmlm.models.config import model_config_from_dict

    source = args.workdir or args.checkpoint
    try:
        cfg = model_config_from_dict(load_config_json(source).model)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except (ValueError, TypeError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{source}/config.json: its model section is not a valid model config ({e})") from None
    try:
        if args.num_vision_tokens == "auto":
            from mmlm.infer.cascade import cascade_budgets

            cascade_budgets(cfg)
        else:
            cfg.check_budget(args.num_vision_tokens)
    except ValueError as e:
        raise UserError(f"--num_vision_tokens {args.num_vision_tokens}: {e}. "
                        f"Supported budgets: {list(cfg.supported_budgets)}") from None


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


def answer(im: InferenceModel, pixels, question: str, history: list[tuple[str, str]], *,
           num_vision_tokens: int | None, max_new_tokens: int, temperature: float, top_p: float,
           rng: jax.Array, out: TextIO, chunk_frames: int | None = None) -> str:
    """Streams the answer to `question` to `out`; returns its text.

    `pixels`: an image's (1, K, H, W, 3), or a `VideoStream` (encoded in chunks of `chunk_frames`,
    `mmlm.infer.chunked`).
    """
    from mmlm.infer.batching import make_batch
    from mmlm.infer.generate import stream
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
    # Prompt lengths rounded to 32 so that a multi-turn chat reuses compiled programs.
    batch = make_batch(im.cfg, [prompt], [pixels], pad_id=im.tokenizer.pad_id, pad_len_to=32, fuse_masks=[fuse])
    stops = set(im.stop_ids)
    for tokens in stream(im.cfg, im.params, batch, max_new_tokens=max_new_tokens, eos_id=im.stop_ids,
                         num_vision_tokens=num_vision_tokens, temperature=temperature, top_p=top_p, rng=rng):
        token = int(tokens[0])
        if token in stops:
            break
        streamer.put(token)
    return streamer.end()


def _questions(prompt: str | None, stdin: TextIO, out: TextIO) -> Iterable[str]:
    if prompt is not None:
        yield prompt
        return
    interactive = stdin.isatty()
    while True:
        if interactive:
            out.write("USER: ")
            out.flush()
        try:
            line = stdin.readline()
        except UnicodeDecodeError as e:
            raise UserError(f"stdin is not valid UTF-8 text ({e.reason} at byte {e.start}); re-encode the "
                            "input as UTF-8") from None
        if not line or not line.strip():
            return
        check_text(line, "a line of stdin")
        yield line.strip()


def run(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    from mmlm.infer.loading import load_inference_model, load_media

    # The streams are looked up at call time (not bound when the module was imported).
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr

    _validate_args(args)
    _check_budget_early(args)
    im = load_inference_model(workdir=args.workdir, checkpoint=args.checkpoint, step=args.step, weights=args.weights,
                              tokenizer=args.tokenizer, template=args.template)
    auto = args.num_vision_tokens == "auto"
    m = im.budget(None if auto else args.num_vision_tokens)
    kind = "image" if args.image is not None else "video"
    if kind == "video":  # decoded as a stream at each question, never held whole
        from mmlm.infer.chunked import open_video

        pixels = open_video(im, args.video, fps=args.fps, max_frames=args.max_frames)
        frames = len(pixels)
    else:
        pixels = load_media(im, args.image, kind)
        frames = 1
    tokens_note = f"{m} vision token(s) per {'frame' if kind == 'video' else 'image'}"
    if auto:
        from mmlm.infer.cascade import cascade_budgets, chat_budget

        tokens_note = (f"auto vision tokens (cascade over {list(cascade_budgets(im.cfg))}, threshold "
                       f"{args.auto_threshold:g})")
    print(f"[mmlm chat] {im.source}: {im.cfg.mode}, {tokens_note}"
          + (f", {frames} frames" if kind == "video" else ""), file=err)
    if args.save_compression_map:
        from mmlm.infer.compression_map import save_compression_map

        if im.cfg.mode != "llava_mini":
            raise UserError("--save_compression_map needs a llava_mini model; the llava15 baseline has "
                            "no compressor")
        try:
            shown = pixels if kind == "image" else load_media(im, args.video, kind, args.max_frames or im.max_frames)
            size = save_compression_map(args.save_compression_map, im.cfg, im.params, shown, num_tokens=m,
                                        mean=im.image_mean, std=im.image_std, panel_size=args.map_panel_size)
        except OSError as e:
            raise UserError(f"--save_compression_map {args.save_compression_map!r}: cannot write it "
                            f"({e.strerror or e})") from None
        except ValueError as e:  # e.g. an extension PIL cannot write
            raise UserError(f"--save_compression_map {args.save_compression_map!r}: {e} "
                            "(use a .png file name)") from None
        print(f"[mmlm chat] compression map ({size[0]}x{size[1]}) -> {args.save_compression_map}", file=err)
    history: list[tuple[str, str]] = []
    rng = jax.random.PRNGKey(args.seed)
    for question in _questions(args.prompt, stdin, out):
        try:
            check_question(question, history)
            if args.prompt is None and stdin.isatty():
                out.write("ASSISTANT: ")
            rng, sub = jax.random.split(rng)
            if auto:
                m, seen = chat_budget(im, pixels, question, history, args.auto_threshold)
                probs = ", ".join(f"{p:.2f}" for p in seen)
                print(f"[mmlm chat] auto: answered with {m} vision token(s) (first-token probability {probs})",
                      file=err)
            text = answer(im, pixels, question, history, num_vision_tokens=m, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, rng=sub, out=out,
                          chunk_frames=args.video_chunk_frames)
        except UserError as e:
            if args.prompt is not None:
                raise
            # Interactive: a question the model cannot take is refused, and the chat goes on.
            print(f"[mmlm chat] {e}; ask again", file=err)
            continue
        history.append((question, text))
    return 0


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


def main(argv: list[str]) -> int:
    return run_command("chat", run, _parser().parse_args(argv), interruptible=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
