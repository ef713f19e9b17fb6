"""`mmlm chat`: ask a model about an image or a video; answers stream as they are generated.

    mmlm chat --workdir /tmp/demo --image cat.png --prompt "What color is the circle?"
    mmlm chat --checkpoint ckpt/ --video clip.mp4            # interactive, multi-turn
    mmlm chat --workdir W --image x.png --num_vision_tokens 4 --save_compression_map map.png

With `--prompt` it answers once and exits; otherwise it reads questions from
stdin (an empty line or EOF ends the chat; earlier turns stay in the context).
The answering itself is `mmlm.infer.chat.answer`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable, TextIO

import jax

from mmlm.cli.common import SEED, add_model_source, check_output_file, number, run_command
from mmlm.errors import UserError
from mmlm.infer.cascade import AUTO, DEFAULT_THRESHOLD, is_auto
from mmlm.infer.chat import answer, check_question, check_text, image_features


def budget_arg(text: str) -> int | str:
    """argparse type of --num_vision_tokens where `auto` is allowed: a positive integer or "auto"."""
    if is_auto(text):
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmlm chat",
        description="Ask a model about an image or a video. One answer with --prompt, an interactive "
                    "multi-turn chat otherwise. Answers stream to stdout as they are generated.")
    add_model_source(p)
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


def _say_budget(m: int, seen: list[float], err: TextIO) -> None:
    probs = ", ".join(f"{p:.2f}" for p in seen)
    print(f"[mmlm chat] auto: answered with {m} vision token(s) (first-token probability {probs})", file=err)


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
        from mmlm.infer.cascade import cascade_budgets

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
    features = image_features(im, pixels) if kind == "image" else None  # the vision tower once per chat
    rng = jax.random.PRNGKey(args.seed)
    for question in _questions(args.prompt, stdin, out):
        try:
            check_question(question, history)
            if args.prompt is None and stdin.isatty():
                out.write("ASSISTANT: ")
            rng, sub = jax.random.split(rng)
            text = answer(im, pixels, question, history, num_vision_tokens=AUTO if auto else m,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          rng=sub, out=out, chunk_frames=args.video_chunk_frames, auto_threshold=args.auto_threshold,
                          vision_features=features, on_budget=lambda m, seen: _say_budget(m, seen, err))
        except UserError as e:
            if args.prompt is not None:
                raise
            # Interactive: a question the model cannot take is refused, and the chat goes on.
            print(f"[mmlm chat] {e}; ask again", file=err)
            continue
        history.append((question, text))
    return 0


def main(argv: list[str]) -> int:
    return run_command("chat", run, build_parser().parse_args(argv), interruptible=True)

