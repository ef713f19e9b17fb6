"""`mmlm data ...`: synthesise, build, inspect datasets and make the tiny tokenizer.

    mmlm data synth --kind shapes --out DIR --num N --seed S [--split val]
    mmlm data build --json FILE [--json SPLIT=FILE ...] --images DIR [--videos DIR] --out DIR [--name NAME]
    mmlm data inspect DIR [--split train] [--num 3]
    mmlm data tokenizer [--out data/tiny_tokenizer.model]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from mmlm.cli.common import SEED, number, run_command
from mmlm.errors import DiskFullError, UserError, disk_full_message, is_disk_full

_DESCRIPTION = """\
Data tools for mmlm.

  synth      write a synthetic LLaVA dataset (JSON + images/videos + eval JSONL)
  build      turn LLaVA JSON + media into a TFDS ArrayRecord dataset for training
  inspect    print decoded examples with the supervised (trained-on) spans marked
  tokenizer  re-train the tiny sentencepiece tokenizer shipped in data/

Typical flow:
  mmlm data synth --kind shapes --out /tmp/shapes --num 2000 --seed 0 --split train
  mmlm data synth --kind shapes --out /tmp/shapes --num 200 --seed 0 --split val
  mmlm data build --json train=/tmp/shapes/train.json --json val=/tmp/shapes/val.json \\
      --images /tmp/shapes --out /tmp/shapes_ds --name shapes
  mmlm data inspect /tmp/shapes_ds --split train --num 3
"""


_positive_int = number(int, 1)
_nonneg_int = number(int, 0)
_positive_float = number(float, 0, low_open=True)


def build_parser() -> argparse.ArgumentParser:
    from mmlm.data import synth, templates

    parser = argparse.ArgumentParser(prog="mmlm data", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic LLaVA dataset split",
                       description="Write a synthetic LLaVA dataset split: OUT/SPLIT.json, "
                                   "OUT/SPLIT_questions.jsonl and media under OUT/images or OUT/videos. "
                                   "Deterministic: the same kind/seed/split always gives the same files.")
    p.add_argument("--kind", required=True, choices=synth.KINDS,
                   help="shapes: coloured shapes, questions on colour/shape/count/position/existence; "
                        "shapes_hd: small shapes that need high resolution; "
                        "grid_shapes: 6-12 shapes on a 4x4 grid, questions about one cell (row, column), "
                        "counts per colour and existence; grid_shapes_hd: the same with small shapes at 128 px "
                        "(shape questions need HD); "
                        "moving_shapes: videos with direction/order-of-appearance questions")
    p.add_argument("--out", required=True, help="output directory (created; splits can share it)")
    p.add_argument("--num", required=True, type=_positive_int, help="number of images/videos")
    p.add_argument("--seed", type=SEED, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--split", default="train", help="split name, e.g. train, val, test (default: %(default)s)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="image/video side in pixels (default: shapes 64, shapes_hd 128, grid_shapes 64, "
                        "grid_shapes_hd 128, moving_shapes 64)")
    p.add_argument("--questions-per-image", type=_positive_int, default=1,
                   help="question-answer turns per record (default: %(default)s)")
    p.add_argument("--category-weights", default="", metavar="NAME=W,...",
                   help="relative frequency of question categories, e.g. color=3,count=0.5 (unlisted: 1; "
                        "categories per kind: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in
                                                             synth.CATEGORIES.items()) + "; default: uniform)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier synthesis of this split in --out (without it, any "
                        "file it would write that exists makes it refuse, before anything is written)")

    p = sub.add_parser("build", help="LLaVA JSON + media -> TFDS ArrayRecord dataset",
                       description="Build a TFDS ArrayRecord dataset from LLaVA-format JSON. Bad records "
                                   "(missing/undecodable media, no assistant turn, <image> markers that do "
                                   "not match the media, paths escaping their root, non-UTF-8 text) are "
                                   "skipped and counted in OUT/build_report.json. Needs TensorFlow "
                                   "(pip install -e .[data]).")
    p.add_argument("--json", required=True, action="append", metavar="[SPLIT=]FILE",
                   help="LLaVA JSON (.json list or .jsonl); repeat as SPLIT=FILE for several splits")
    p.add_argument("--images", default=None, metavar="DIR", help="root directory of image paths")
    p.add_argument("--videos", default=None, metavar="DIR", help="root directory of video paths")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--name", default="llava_data",
                   help="dataset name: lowercase letters, digits, '_' (default: %(default)s)")
    p.add_argument("--split", default="train", help="split of a --json given without SPLIT= (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing build of NAME in OUT")
    p.add_argument("--max-video-frames", type=_positive_int, default=64,
                   help="frames stored per video after 1 fps sampling (default: %(default)s)")
    p.add_argument("--video-fps", type=_positive_float, default=1.0,
                   help="video sampling rate, frames per second (default: %(default)s)")
    p.add_argument("--max-frame-side", type=_positive_int, default=768,
                   help="stored video frames are downscaled to fit this side (default: %(default)s)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="threads decoding media (default: CPU count, at most 16)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("text length check", "count the conversations a model's text length cuts (in the "
                             "summary and the report; nothing is dropped): give the settings of the model to train")
    g.add_argument("--tokenizer", default="", help="tokenizer path (default: the tiny tokenizer in data/)")
    g.add_argument("--template", default="vicuna_v1", choices=templates.TEMPLATES,
                   help="conversation template (default: %(default)s)")
    g.add_argument("--max-text-len", type=number(int, 2), default=2048,
                   help="text length T in tokens, data.max_text_len (default: %(default)s)")

    p = sub.add_parser("inspect", help="print decoded examples with supervised spans marked",
                       description="Print examples of a built dataset as the model sees them: the "
                                   "templated text with supervised (trained-on) tokens marked, the "
                                   "placeholder, truncation; saves each example's views/frames as a PNG.")
    p.add_argument("dataset_dir", metavar="DIR", help="an `mmlm data build --out` directory")
    p.add_argument("--split", default="train", help="split to read (default: %(default)s)")
    p.add_argument("--num", type=_positive_int, default=3, help="examples to show (default: %(default)s)")
    p.add_argument("--start", type=_nonneg_int, default=0, help="first example index (default: %(default)s)")
    p.add_argument("--template", default="vicuna_v1", choices=templates.TEMPLATES,
                   help="conversation template (default: %(default)s)")
    p.add_argument("--tokenizer", default="", help="tokenizer path (default: the tiny tokenizer in data/)")
    p.add_argument("--max-text-len", type=number(int, 2), default=256, help="T (default: %(default)s)")
    p.add_argument("--image-size", type=_positive_int, default=336, help="H = W (default: %(default)s)")
    p.add_argument("--hd-grid", type=_positive_int, default=1,
                   help="HD grid n: n x n crops + the whole image; 1 = no HD (default: %(default)s)")
    p.add_argument("--max-frames", type=_positive_int, default=8, help="F for videos (default: %(default)s)")
    p.add_argument("--save-dir", default="mmlm_inspect",
                   help="where to save each example's image sheet; '' to skip (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace image sheets already in --save-dir")
    p.add_argument("--show", action="store_true", help="also open the images in a viewer (PIL show)")
    p.add_argument("--color", action="store_true", help="mark supervised tokens with ANSI green")

    p = sub.add_parser("tokenizer", help="re-train the tiny sentencepiece tokenizer", add_help=False)
    return parser


def _synth(args) -> int:
    from mmlm.data import synth

    path = synth.synthesize(args.kind, args.out, args.num, args.seed, args.split,
                            image_size=args.image_size, questions_per_image=args.questions_per_image,
                            category_weights=args.category_weights, overwrite=args.overwrite)
    print(f"wrote {path} and {path.parent / (args.split + '_questions.jsonl')}")
    return 0


def _build(args) -> int:
    from mmlm.data import build
    from mmlm.data.supervision import TextSettings

    jsons = build.parse_json_args(args.json, args.split)  # a BuildError is a UserError
    report = build.build_dataset(
        jsons, args.images, args.out, videos_dir=args.videos, name=args.name,
        overwrite=args.overwrite, max_video_frames=args.max_video_frames, video_fps=args.video_fps,
        max_frame_side=args.max_frame_side, workers=args.workers, progress=not args.quiet,
        text=TextSettings(args.tokenizer, args.template, args.max_text_len))
    print(report.pop("_summary"))
    print(f"report: {args.out}/{build.REPORT_FILE}")
    return 0


def _inspect(args) -> int:
    import ml_collections

    from mmlm.data.build import BuildError
    from mmlm.data.config import default_data_config
    from mmlm.data.inspect_data import inspect

    config = ml_collections.ConfigDict()
    config.data = default_data_config()
    d = config.data
    d.dataset_dir, d.template, d.max_text_len = args.dataset_dir, args.template, args.max_text_len
    d.image_size, d.hd_grid, d.max_frames = args.image_size, args.hd_grid, args.max_frames
    if args.tokenizer:
        d.tokenizer = args.tokenizer
    try:
        return inspect(args.dataset_dir, args.split, config, num=args.num, start=args.start,
                       save_dir=args.save_dir or None, show=args.show, color=args.color,
                       overwrite=args.overwrite)
    except (BuildError, ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "tokenizer":  # its own parser
        return tokenizer_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return run_command(f"data {args.command}", _dispatch, args, interruptible=True)


def _dispatch(args) -> int:
    try:
        return {"synth": _synth, "build": _build, "inspect": _inspect}[args.command](args)
    except UserError:
        raise
    except (OSError, ValueError) as e:  # unreadable / malformed input files and directories
        if is_disk_full(e):
            raise DiskFullError(disk_full_message(getattr(e, "filename", None) or getattr(args, "out", None))) from None
        raise UserError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())


def tokenizer_main(argv: list[str]) -> int:
    """`mmlm data tokenizer`: trains the tiny tokenizer (`mmlm.data.make_tokenizer`); its own parser."""
    from mmlm.data.make_tokenizer import DEFAULT_VOCAB_SIZE, check_tokenizer, train_tokenizer
    from mmlm.data.tokenizer import TINY_TOKENIZER_PATH
    from mmlm.safe_io import refuse_existing, write_bytes_atomic

    parser = argparse.ArgumentParser(
        prog="mmlm data tokenizer",
        description="Train the tiny sentencepiece tokenizer for the synthetic datasets "
                    "(deterministic: the same command always writes the same file).")
    parser.add_argument("--out", default=str(TINY_TOKENIZER_PATH),
                        help="output .model path (default: %(default)s)")
    parser.add_argument("--vocab-size", type=number(int, 64), default=DEFAULT_VOCAB_SIZE,
                        help="number of pieces (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (the default path is the shipped tokenizer, which this "
                             "command regenerates byte for byte)")
    args = parser.parse_args(argv)
    if args.vocab_size < 64:
        parser.error(f"--vocab-size must be >= 64, got {args.vocab_size}")
    try:
        refuse_existing(args.out, "--out", args.overwrite)
    except UserError as e:
        print(f"mmlm data tokenizer: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, train_tokenizer(args.vocab_size))
    problems = check_tokenizer(out)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 1 if problems else 0
